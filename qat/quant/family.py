"""`LayerFamily` and `Families`: the one table of layer kinds a recipe can quantize.

A family is one float layer type end to end: the fake-quant class that replaces it (whose
`FLOAT_TYPE` is what a recipe's `types` match and what it subclasses), the fused Conv-BN class
where BatchNorm can fold into it, the integer class `convert` makes (whose name is the
artifact manifest's layer kind) and the function that writes its ONNX nodes. The quantization
core reads only the first two; the integer and ONNX fields are data to it. The shipped table is
`qat.export.families.shipped()`; a new family is one `LayerFamily` added with `with_family`, and
the resulting `Families` is passed to `qat.plan`/`prepare` and `qat.load` (a prepared model
carries its families in its `Provenance`: `convert` and the ONNX export read them there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from qat.quant.modules import QATMixin


@dataclass(frozen=True)
class LayerFamily:
    """One layer kind: float type -> fake-quant class -> integer class -> ONNX nodes.

    `qat_type` subclasses the float layer (`FLOAT_TYPE`) and `QATMixin`; `int_type` has a
    `from_qat(mod, weight_spec, input_spec, output_spec)` constructor; `onnx(g, layer, x, t)`
    builds the op between the layer's activation quantizers (`qat.export.onnx.layers`).
    A *container* family (`int_type` None, e.g. `MultiheadAttention`) has a `qat_type` that is
    a plain module calling fake-quant children: `convert` converts the children and keeps the
    container, the artifact records it and `load` rebuilds it with `from_float(float_module)`.

    Example:
        >>> from qat.quant.modules import QATLinear
        >>> LayerFamily(QATLinear).float_type.__name__
        'Linear'
    """

    qat_type: type[nn.Module]
    int_type: type[nn.Module] | None = None
    onnx: Callable[..., Any] | None = None
    conv_bn_type: type[QATMixin] | None = None

    @property
    def float_type(self) -> type[nn.Module]:
        return self.qat_type.FLOAT_TYPE

    @property
    def container(self) -> bool:
        return self.int_type is None and not issubclass(self.qat_type, QATMixin)

    @property
    def kind(self) -> str | None:
        """The manifest's name for the integer layer."""
        return None if self.int_type is None else self.int_type.__name__


class Families:
    """An immutable set of `LayerFamily`, looked up by float, fake-quant, integer or kind.

    Example:
        >>> from qat.quant.modules import QATLinear
        >>> fams = Families([LayerFamily(QATLinear)])
        >>> fams.qat_class_for(nn.Linear(2, 2)).__name__, fams.qat_class_for(nn.ReLU())
        ('QATLinear', None)
    """

    def __init__(self, families: Iterable[LayerFamily]) -> None:
        self._families = tuple(families)
        self._by_float = {f.float_type: f.qat_type for f in self._families}
        floats = [f.float_type for f in self._families]
        if len(set(floats)) != len(floats):
            raise ValueError("two layer families for one float type: use with_family to replace")
        kinds = [f.kind for f in self._families if f.kind is not None]
        if len(set(kinds)) != len(kinds):
            twice = sorted({k for k in kinds if kinds.count(k) > 1})
            raise ValueError(f"two layer families with integer class {', '.join(twice)}: give "
                             "each family its own integer class (a subclass will do); the "
                             "artifact's manifest names the layer by it")  # fmt: skip

    def __iter__(self):
        return iter(self._families)

    def with_family(self, family: LayerFamily) -> Families:
        """These families plus `family` (replacing the one for the same float type)."""
        kept = [f for f in self._families if f.float_type is not family.float_type]
        return Families([*kept, family])

    def qat_class_for(self, mod: nn.Module) -> type[QATMixin] | None:
        """The fake-quant class for float module `mod`, or None.

        A subclass of a float layer qualifies only if it keeps the base `forward` (otherwise
        the fake-quant forward would silently replace its computation).
        """
        if isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return None  # MultiheadAttention's out_proj: MHA reads its weight, never calls it
        for float_type in type(mod).__mro__:
            if float_type in self._by_float:
                covers = type(mod).forward is float_type.forward
                return self._by_float[float_type] if covers else None
        return None

    def conv_bn_class(self, qat_type: type[QATMixin]) -> type[QATMixin] | None:
        return next((f.conv_bn_type for f in self._families if f.qat_type is qat_type), None)

    def of_qat(self, mod: QATMixin) -> LayerFamily:
        """The family of fake-quant layer `mod` (its own class or its fused Conv-BN class)."""
        for f in self._families:
            if type(mod) in (f.qat_type, f.conv_bn_type):
                return f
        raise KeyError(f"no layer family has fake-quant class {type(mod).__name__}")

    def of_int(self, layer: nn.Module) -> LayerFamily:
        for f in self._families:
            if type(layer) is f.int_type:
                return f
        raise KeyError(f"no layer family has integer class {type(layer).__name__}")

    def of_container(self, name: str) -> LayerFamily | None:
        """The container family whose fake-quant class is called `name`."""
        return next((f for f in self._families if f.container and f.qat_type.__name__ == name),
                    None)  # fmt: skip

    def containers(self, model: nn.Module) -> dict[str, str]:
        """Module path -> container class name, for every container module in `model`."""
        types = tuple(f.qat_type for f in self._families if f.container)
        return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, types)}

    def of_kind(self, kind: str) -> LayerFamily | None:
        return next((f for f in self._families if f.kind == kind), None)

    def kinds(self) -> list[str]:
        return [f.kind for f in self._families if f.kind is not None]
