"""`IntLayer`: the stored integer state shared by the integer layers, and its numerics.

Buffers (all persistent, so `state_dict` is the artifact's tensor set):
`weight_codes` (int8 / uint8, or uint8 packed nibbles, see `packing`), `weight_scale` (fp32, or
fp16 when the spec asks for fp16 scales: the same values training used), `weight_zero_point`
(uint8, asymmetric grids only; symmetric grids have zero point 0), `float_weight` (only when
the weight is not quantized), `bias` (fp32), and `{input,output}_scale` / `_zero_point` for
static activation quantizers. Dynamic quantizers store nothing: their codes and scales come
from `grid.dynamic_quantize` at run time, exactly as in training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qat.export.integer import packing
from qat.quant import grid
from qat.quant.spec import QuantSpec, check_integer_layout


def _scale_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.float16 if spec.scale_dtype == "fp16" else torch.float32


class IntLayer(nn.Module):
    """Base of the integer layers; subclasses define `forward` and `layer_args()`.

    Example:
        >>> from qat.export import IntLinear
        >>> lin = IntLinear(4, 2, bias=False, weight_spec=QuantSpec(bits=8))
        >>> lin.set_weight(torch.tensor([[1.0, -2, 0, 0], [0, 0, 3, 4]]), torch.tensor(1 / 32),
        ...                torch.tensor(0.0))
        >>> lin.int_weight().tolist()
        [[32, -64, 0, 0], [0, 0, 96, 127]]
        >>> lin.layer_config()["specs"]["weight"]["bits"]
        8
    """

    def _init_quant_state(
        self,
        weight_shape: tuple[int, ...],
        weight_spec: QuantSpec | None,
        input_spec: QuantSpec | None,
        output_spec: QuantSpec | None,
        bias: bool,
        out_channels: int | None = None,
    ) -> None:
        """Buffers for a weight of `weight_shape` and a bias of `out_channels` (default: the
        weight's first dim, its output channels except in transposed convolutions)."""
        self.weight_shape = tuple(weight_shape)
        # Parity runs set this to align rounding ties with the reference (`parity.align`).
        self.align_act = None
        self.weight_spec, self.input_spec, self.output_spec = weight_spec, input_spec, output_spec
        ws = weight_spec
        if ws is None:
            self.register_buffer("float_weight", torch.zeros(weight_shape))
        else:
            ws.check_role("weight").check_shape(self.weight_shape)
            pshape = grid.param_shape(ws, self.weight_shape)
            dtype = torch.uint8 if packing.is_packed(ws) else packing.code_dtype(ws)
            stored = packing.stored_shape(ws, self.weight_shape)
            self.register_buffer("weight_codes", torch.zeros(stored, dtype=dtype))
            self.register_buffer("weight_scale", torch.ones(pshape, dtype=_scale_dtype(ws)))
            if not ws.symmetric:
                self.register_buffer("weight_zero_point", torch.zeros(pshape, dtype=torch.uint8))
        n_out = weight_shape[0] if out_channels is None else out_channels
        # The bias is int32 codes in steps of s_x * s_w where the contract puts it on that grid.
        self.bias_grid = bias and grid.bias_on_grid(weight_spec, input_spec)
        dtype = torch.int32 if self.bias_grid else torch.float32
        self.register_buffer("bias", torch.zeros(n_out, dtype=dtype) if bias else None)
        for role, spec in (("input", input_spec), ("output", output_spec)):
            if spec is None or spec.dynamic:
                continue
            spec.check_role(role)
            if spec.granularity != "per_tensor":
                raise ValueError(f"{spec.path}: static {role} quantizers must be per_tensor")
            self.register_buffer(f"{role}_scale", torch.ones((), dtype=_scale_dtype(spec)))
            if not spec.symmetric:
                self.register_buffer(f"{role}_zero_point", torch.zeros((), dtype=torch.uint8))

    # -- filling from a trained fake-quant layer ----------------------------------------------
    @classmethod
    def from_qat(
        cls,
        mod: nn.Module,
        weight_spec: QuantSpec | None,
        input_spec: QuantSpec | None,
        output_spec: QuantSpec | None,
    ) -> IntLayer:
        """An empty integer layer shaped like fake-quant layer `mod` (`convert` fills it)."""
        raise NotImplementedError

    @torch.no_grad()
    def set_weight(
        self, w: torch.Tensor, scale: torch.Tensor | None = None, zp: torch.Tensor | None = None
    ) -> None:
        """Store `w` quantized with the given qparams (float when the weight is not quantized)."""
        if self.weight_spec is None:
            self.float_weight.copy_(w)
            return
        codes = grid.quantize(w.detach().float(), scale, zp, self.weight_spec)
        self.weight_codes.copy_(packing.encode(codes, self.weight_spec))
        self.weight_scale.copy_(scale)
        if not self.weight_spec.symmetric:
            self.weight_zero_point.copy_(zp)

    @torch.no_grad()
    def set_bias(self, b: torch.Tensor) -> None:
        """Store float bias `b`: as int32 codes on the bias grid (set the weight and the input
        scale first), else as is."""
        if self.bias_grid:
            self.bias.copy_(grid.quantize_bias(b, self.bias_scale()).to(torch.int32))
        else:
            self.bias.copy_(b)

    def bias_scale(self) -> torch.Tensor:
        """`s_x * s_w` in fp32 per output channel: the step of the int32 bias codes."""
        return grid.bias_scale(self.input_scale, self.weight_scale, self.bias.numel())

    def float_bias(self) -> torch.Tensor | None:
        """The bias in fp32 as training adds it (`codes * s_x * s_w` on the bias grid)."""
        if self.bias is None or not self.bias_grid:
            return self.bias
        return grid.dequantize_bias(self.bias, self.bias_scale(), torch.float32)

    @torch.no_grad()
    def set_act_qparams(self, role: str, scale: torch.Tensor, zp: torch.Tensor) -> None:
        getattr(self, f"{role}_scale").copy_(scale.reshape(()))
        if not getattr(self, f"{role}_spec").symmetric:
            getattr(self, f"{role}_zero_point").copy_(zp.reshape(()))

    # -- numerics -----------------------------------------------------------------------------
    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight scale and zero point in the contract's fp32 form."""
        s = self.weight_scale.float()
        z = (
            self.weight_zero_point.float()
            if not self.weight_spec.symmetric
            else torch.zeros_like(s)
        )
        return s, z

    def int_weight(self) -> torch.Tensor:
        """Weight codes unpacked to int16, in the weight's shape."""
        return packing.decode(self.weight_codes, self.weight_spec, self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """`(q - z) * s` in fp32: bit-identical to the fake-quantized weight of training."""
        if self.weight_spec is None:
            return self.float_weight
        s, z = self.weight_qparams()
        return grid.dequantize(self.int_weight(), s, z, self.weight_spec)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight, for inspection and code that probes `.weight`."""
        return self.dequantized_weight()

    def centered_weight(self) -> torch.Tensor:
        """`q_w - z_w` as float64 (integer-valued), in the weight's shape."""
        q = self.int_weight().to(torch.float64)
        if self.weight_spec.symmetric:
            return q
        z = self.weight_zero_point.to(torch.float64)
        v = grid.to_view(q, self.weight_spec) - z[..., None]
        return grid.from_view(v, self.weight_spec, q.shape)

    def act_qparams(self, role: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of activation `x` (stored, or computed per call if dynamic)."""
        spec = getattr(self, f"{role}_spec")
        if spec.dynamic:
            return grid.dynamic_qparams(x, spec)
        s = getattr(self, f"{role}_scale").float()
        if spec.symmetric:
            return s, torch.zeros_like(s)
        return s, getattr(self, f"{role}_zero_point").float()

    def act_codes(self, role: str, x: torch.Tensor):
        """`(codes, scale, zero_point)` of activation `x` as given (codes integer-valued fp32)."""
        spec = getattr(self, f"{role}_spec")
        if spec.dynamic:
            return grid.dynamic_quantize(x, spec)
        s, z = self.act_qparams(role, x)
        return grid.quantize(x, s, z, spec), s, z

    def quantize_act(self, role: str, x: torch.Tensor):
        """`act_codes` of `x` after tie alignment, when a parity run has set it."""
        if self.align_act is not None:
            x = self.align_act(self, role, x)
        return self.act_codes(role, x)

    def fake_quant_act(self, role: str, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize like training (for float-path inputs and for outputs)."""
        spec = getattr(self, f"{role}_spec")
        if spec is None:
            return x
        q, s, z = self.quantize_act(role, x)
        return grid.dequantize(q, s, z, spec)

    def finish(self, acc: torch.Tensor, scale: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """`acc * scale + bias` in float64 (bias along `channel_dim`), then fp32; an int32 bias
        joins the accumulator first, `(acc + b) * scale`, as integer kernels add it."""
        if self.bias is None:
            return (acc * scale).float()
        shape = [1] * acc.ndim
        shape[channel_dim] = -1
        b = self.bias.to(torch.float64).reshape(shape)
        return ((acc + b) * scale if self.bias_grid else acc * scale + b).float()

    def check_integer_layout(
        self, name: str, input_granularities: tuple[str, ...], output_axis: int = 0
    ) -> None:
        """The integer path factors scales out of each dot product: check that it can."""
        check_integer_layout(self.weight_spec, self.input_spec, len(self.weight_shape),
                             input_granularities, name, output_axis)  # fmt: skip

    # -- description --------------------------------------------------------------------------
    def layer_args(self) -> dict[str, Any]:
        raise NotImplementedError

    def layer_config(self) -> dict[str, Any]:
        """JSON-ready description: kind, constructor arguments, specs (the manifest's entry)."""
        specs = {
            role: (s.to_dict() if s is not None else None)
            for role, s in (
                ("weight", self.weight_spec),
                ("input", self.input_spec),
                ("output", self.output_spec),
            )
        }
        return {"kind": type(self).__name__, "args": self.layer_args(), "specs": specs}

    def extra_repr(self) -> str:
        parts = [f"{k}={v}" for k, v in self.layer_args().items()]
        for role in ("weight", "input", "output"):
            spec = getattr(self, f"{role}_spec")
            if spec is not None:
                parts.append(f"{role}: {spec.describe()}")
        return ", ".join(parts)
