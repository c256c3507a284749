"""`QuantSpec`: what one tensor's quantizer does, as YAML-friendly primitives."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
OBSERVERS = ("minmax", "ema", "percentile", "mse")
LEARN = ("none", "lsq", "lsq_plus", "pact")
SCALE_DTYPES = ("fp32", "fp16")
# How codes are computed from the range: `exact` divides by the stored scale (the contract's
# `round(x / s)`, as ONNX QuantizeLinear); `llama_cpp` multiplies by `qmax / amax` in fp32 and
# stores `fp16(amax / qmax)`, as llama.cpp's CPU kernels quantize activations to Q8_0 blocks.
ARITHMETICS = ("exact", "llama_cpp")
ROLES = ("weight", "input", "output")


def _fail(path: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{path}: got {value!r}; allowed: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# field -> (accepts value?, what is allowed): each field checked on its own, so a recipe rule
# that overrides only some fields is validated key by key when it is read.
_FIELD_RULES: dict[str, tuple[Any, str]] = {
    "bits": (lambda v: _is_int(v) and 2 <= v <= 8, "an integer from 2 to 8"),
    "symmetric": (lambda v: isinstance(v, bool), "true or false"),
    "dynamic": (lambda v: isinstance(v, bool), "true or false"),
    "narrow_range": (lambda v: isinstance(v, bool), "true or false"),
    "granularity": (lambda v: v in GRANULARITIES, ", ".join(GRANULARITIES)),
    "observer": (lambda v: v in OBSERVERS, ", ".join(OBSERVERS)),
    "learn": (lambda v: v in LEARN, ", ".join(LEARN)),
    "scale_dtype": (lambda v: v in SCALE_DTYPES, ", ".join(SCALE_DTYPES)),
    "arithmetic": (lambda v: v in ARITHMETICS, ", ".join(ARITHMETICS)),
    "axis": (_is_int, "an integer dimension index"),
    "group_size": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or null"),
    "momentum": (lambda v: _is_num(v) and 0.0 <= v < 1.0, "a number in [0, 1)"),
    "percentile": (lambda v: _is_num(v) and 50.0 < v <= 100.0, "a number in (50, 100]"),
}


# field -> (the setting it needs, to say so): a key that means nothing without that setting.
_NEEDS: dict[str, tuple[str, Any]] = {
    "momentum": ("observer", "ema"),
    "percentile": ("observer", "percentile"),
    "axis": ("granularity", "per_channel"),
}
_DEFAULTS = {"observer": "minmax", "granularity": "per_tensor"}
# role -> field -> values that role cannot take, with what it can.
_ROLE_REFUSES: dict[str, dict[str, tuple[tuple[Any, ...], str]]] = {
    "weight": {
        "granularity": (("per_token",), "per_tensor, per_channel, per_group"),
        "learn": (("pact",), "none, lsq, lsq_plus for weights"),
        "dynamic": ((True,), "false for weights"),
    },
    "input": {
        "granularity": (("per_channel",), "per_tensor, per_token, or per_group (dynamic, groups "
                        "along the last dim) for activations"),
    },
}
_ROLE_REFUSES["output"] = _ROLE_REFUSES["input"]


def check_keys_apply(fields: dict[str, Any], path: str) -> None:
    """Refuse a key a recipe wrote that its spec ignores (`momentum` without the ema
    observer, ...): a spec as written by a person, not one serialized with every default."""
    for k, (other, needed) in _NEEDS.items():
        has = fields.get(other, _DEFAULTS[other])
        if k in fields and has != needed:
            raise _fail(f"{path}.{k}", fields[k], f"only with {other}: {needed} (this spec has "
                        f"{other}: {has}); drop {k} or set {other}: {needed}")


def check_role_fields(role: str, fields: dict[str, Any], path: str) -> None:
    """Refuse values that `role` cannot take, for a whole spec or a recipe rule's part of one
    (whose fields `check_field` has accepted, so a bool field holds a bool)."""
    if role not in ROLES:
        raise _fail(f"{path} role", role, ", ".join(ROLES))
    for name, (refused, allowed) in _ROLE_REFUSES[role].items():
        if name in fields and fields[name] in refused:
            raise _fail(f"{path}.{name}", fields[name], allowed)


def check_integer_layout(
    weight: QuantSpec | None,
    input: QuantSpec | None,
    weight_ndim: int,
    input_granularities: tuple[str, ...],
    where: str,
    output_axis: int = 0,
) -> None:
    """A layer with a quantized input and weight runs as integers, factoring the scales out of
    each dot product: refuse specs whose scales vary inside one (checked at `plan`, and by
    the integer layers). `output_axis` is the weight's output-channel dim (1 for transposed
    convolutions, whose weight is (in, out, *k))."""
    if weight is None or input is None:
        return
    if weight.granularity == "per_channel" and weight.axis % weight_ndim != output_axis:
        raise _fail(f"{weight.path}.axis", weight.axis, f"{output_axis} (output channels) for "
                    f"{where}: scales along another axis vary inside each dot product of its "
                    "quantized input")
    if weight.granularity == "per_group" and output_axis != 0:
        raise _fail(f"{weight.path}.granularity", "per_group", f"per_tensor or per_channel "
                    f"(axis {output_axis}) for {where}: its groups would run across output "
                    "channels")
    if (input.granularity == weight.granularity == "per_group"
            and input.group_size != weight.group_size):
        raise _fail(f"{input.path}.group_size", input.group_size, f"{weight.group_size}, the "
                    f"weight's group size, for {where}: each dot product of a group is scaled "
                    "by one input and one weight scale")  # fmt: skip
    if input.granularity not in input_granularities:
        raise _fail(f"{input.path}.granularity", input.granularity,
                    f"{' or '.join(input_granularities)} for {where} (its input scales must "
                    "be constant inside each dot product)")


def check_field(name: str, value: Any, path: str = "spec") -> None:
    """Raise `ValueError` naming `path.name` unless `value` is allowed for field `name`."""
    if name not in _FIELD_RULES:
        raise _fail(f"{path}.{name}", name, "one of " + ", ".join(_FIELD_RULES))
    ok, allowed = _FIELD_RULES[name]
    try:
        good = bool(ok(value))
    except TypeError:  # unhashable values in `in` checks
        good = False
    if not good:
        raise _fail(f"{path}.{name}", value, allowed)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is fake-quantized.

    The grid is signed (`-2^(b-1) .. 2^(b-1)-1`, zero point 0) when `symmetric`, unsigned
    (`0 .. 2^b-1`, integer zero point) otherwise; `narrow_range` drops the lowest code.

    Example:
        >>> spec = QuantSpec(bits=4, granularity="per_group", group_size=32)
        >>> spec.qmin, spec.qmax
        (-8, 7)
        >>> QuantSpec(bits=8, symmetric=False).qrange
        (0, 255)
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_tensor"
    axis: int = 0
    group_size: int | None = None
    dynamic: bool = False
    narrow_range: bool = False
    observer: str = "minmax"
    momentum: float = 0.9
    percentile: float = 99.99
    learn: str = "none"
    scale_dtype: str = "fp32"
    arithmetic: str = "exact"
    # Not a quantization field: where this spec came from, for error messages.
    path: str = field(default="spec", compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "path":
                check_field(f.name, getattr(self, f.name), self.path)
        p = self.path
        if self.granularity == "per_group" and self.group_size is None:
            raise _fail(f"{p}.group_size", None, "a positive integer when granularity=per_group")
        if self.granularity != "per_group" and self.group_size is not None:
            raise _fail(f"{p}.group_size", self.group_size, "null unless granularity=per_group")
        if self.granularity == "per_token" and not self.dynamic:
            raise _fail(
                f"{p}.dynamic", False, "true when granularity=per_token (tokens vary per call)"
            )
        if self.dynamic and self.learn != "none":
            raise _fail(f"{p}.learn", self.learn, "none when dynamic=true (scales come per call)")
        if self.dynamic and self.observer != "minmax":
            raise _fail(f"{p}.observer", self.observer, "minmax when dynamic=true")
        if self.learn == "lsq_plus" and self.symmetric:
            raise _fail(
                f"{p}.learn", self.learn, "lsq_plus only with symmetric=false (it learns an offset)"
            )
        if self.narrow_range and not self.symmetric:
            raise _fail(f"{p}.narrow_range", True, "false when symmetric=false")
        if self.arithmetic == "llama_cpp":
            self._check_llama_cpp()

    def _check_llama_cpp(self) -> None:
        """llama.cpp quantizes activations per call, symmetric, `[-qmax, qmax]`, fp16 scales."""
        need = {"dynamic": True, "symmetric": True, "narrow_range": True, "scale_dtype": "fp16"}
        for k, v in need.items():
            if getattr(self, k) != v:
                raise _fail(f"{self.path}.{k}", getattr(self, k), f"{v!r} with arithmetic: "
                            "llama_cpp (its activation blocks are dynamic, symmetric, "
                            "[-127, 127] with fp16 scales)")  # fmt: skip

    # -- the integer grid -------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        if self.symmetric:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def qrange(self) -> tuple[int, int]:
        return self.qmin, self.qmax

    # -- roles ------------------------------------------------------------------------------
    def check_role(self, role: str) -> QuantSpec:
        """Raise `ValueError` if this spec cannot quantize a tensor of `role`; return self."""
        check_role_fields(role, self.to_dict(), self.path)
        if role != "weight" and self.granularity == "per_group" and not self.dynamic:
            raise _fail(f"{self.path}.dynamic", False, "true for per_group activations (their "
                        "groups run along the last dim, scaled per call)")  # fmt: skip
        return self

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise `ValueError` if a weight of `shape` cannot use this granularity."""
        p = self.path
        if self.granularity == "per_channel" and not -len(shape) <= self.axis < len(shape):
            raise _fail(f"{p}.axis", self.axis, f"a dimension of a tensor of shape {tuple(shape)}")
        if self.granularity == "per_group":
            cols = 1
            for s in shape[1:]:
                cols *= s
            if len(shape) < 2 or cols % self.group_size:
                raise _fail(
                    f"{p}.group_size",
                    self.group_size,
                    f"a divisor of the input size {cols} of a weight of shape {tuple(shape)}",
                )

    def check_width(self, width: int | None) -> None:
        """Raise `ValueError` if per-group activation groups cannot tile a last dim of `width`
        (None where it varies, as a convolution's image width does)."""
        if self.granularity != "per_group":
            return
        if width is None:
            raise _fail(f"{self.path}.granularity", "per_group", "per_tensor or per_token for "
                        "a layer whose activations' last dim varies (groups run along it)")
        if width % self.group_size:
            raise _fail(f"{self.path}.group_size", self.group_size,
                        f"a divisor of the activation's last dim {width}")

    def describe(self) -> str:
        """Short human form, e.g. `w4 per_group(32) sym lsq`."""
        g = self.granularity
        if g == "per_group":
            g = f"per_group({self.group_size})"
        elif g == "per_channel":
            g = f"per_channel(axis={self.axis})"
        parts = [f"{self.bits}b", g, "sym" if self.symmetric else "asym"]
        parts.append("dynamic" if self.dynamic else self.observer)
        if self.learn != "none":
            parts.append(self.learn)
        if self.narrow_range:
            parts.append("narrow")
        if self.scale_dtype != "fp32":
            parts.append(f"scale={self.scale_dtype}")
        if self.arithmetic != "exact":
            parts.append(self.arithmetic)
        return " ".join(parts)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "path"]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str = "spec") -> QuantSpec:
        """Build from a mapping, refusing unknown keys with the key path."""
        if not isinstance(d, dict):
            raise _fail(path, d, "a mapping of QuantSpec fields")
        for k, v in d.items():
            check_field(k, v, path)
        return cls(**d, path=path)
