"""`IntLinear`: an integer `nn.Linear`, and `integer_matmul` / `grouped_matmul`, its GEMMs.

With a quantized input and weight the layer computes with integers: the input is quantized to
codes with `grid.quantize` (division, half-to-even, as in training), then
`sum (q_x - z_x) * (q_w - z_w)` is accumulated in float64, which is exact for integer-valued
operands while partial sums stay below 2^53 (an int32 accumulator's range is far below that),
then `* s_x * s_w + bias` and the cast to fp32. Per-group weights and per-group (dynamic)
inputs scale each group of 32 or so columns apart: their scales are folded into the columns of
both operands (`scaled_matmul`), one float64 GEMM instead of one per group. Weight-only layers
dequantize the weight (bit-identical to the fake-quantized weight of training) and run the
float op; so do layers whose weight stayed float.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qat.export.integer.layer import IntLayer
from qat.quant import grid
from qat.quant.modules import QATLinear
from qat.quant.spec import QuantSpec


class IntLinear(IntLayer):
    """Integer `nn.Linear`.

    Example:
        >>> lin = IntLinear(8, 4, weight_spec=QuantSpec(bits=4, granularity="per_channel"),
        ...                 input_spec=QuantSpec(bits=8, symmetric=False))
        >>> lin(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_spec: QuantSpec | None = None,
        input_spec: QuantSpec | None = None,
        output_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_quant_state(
            (out_features, in_features), weight_spec, input_spec, output_spec, bias
        )
        self.check_integer_layout(type(self).__name__, QATLinear.INTEGER_INPUTS)

    @classmethod
    def from_qat(cls, mod, weight_spec, input_spec, output_spec) -> IntLinear:
        return cls(mod.in_features, mod.out_features, mod.export_bias() is not None,
                   weight_spec, input_spec, output_spec)  # fmt: skip

    def layer_args(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_spec is None or self.input_spec is None:
            y = F.linear(self.fake_quant_act("input", x), self.dequantized_weight(), self.bias)
        else:
            y = self._integer_forward(x)
        return self.fake_quant_act("output", y)

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s_x, z_x = self.quantize_act("input", x)
        xs, ws = self.input_spec, self.weight_spec
        lead, k = x.shape[:-1], x.shape[-1]
        centered = grid.to_view(q.to(torch.float64), xs) - z_x.to(torch.float64)[..., None]
        xc = grid.from_view(centered, xs, q.shape).reshape(-1, k)
        s_w = self.weight_scale.to(torch.float64)
        group = next((s.group_size for s in (ws, xs) if s.granularity == "per_group"), None)
        if group is None:  # per-token scales have shape `lead`, per-tensor ones (): (M, 1)
            acc = integer_matmul(xc, self.centered_weight())
            y = self.finish(acc, s_x.to(torch.float64).reshape(-1, 1) * s_w, channel_dim=-1)
        else:
            x_cols = _column_scales(s_x.to(torch.float64), xs, xc.shape[0])
            w_cols = _column_scales(s_w, ws, self.out_features)
            acc = scaled_matmul(xc, self.centered_weight(), x_cols, w_cols)
            y = self.finish(acc, torch.ones((), dtype=torch.float64), -1)
        return y.reshape(*lead, self.out_features)


def integer_matmul(xc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
    """Exact `xc @ wc.T` for integer-valued float64 `xc` (M, K) and `wc` (N, K).

    Float64 holds every integer below 2^53 exactly, so every partial sum is exact while
    K * max|product| < 2^53 (products of 8-bit codes are below 2^16: K up to 2^37), far beyond
    where an int32 accumulator (the contract's reference) would overflow.
    """
    return xc @ wc.T  # (M, N)


def _column_scales(scale: torch.Tensor, spec: QuantSpec, rows: int) -> torch.Tensor:
    """Each column's scale, broadcastable to an operand's `(rows, K)`: `(rows, K)` per group,
    `(rows, 1)` per row (token, channel), `(1, 1)` per tensor."""
    if spec.granularity == "per_group":
        return scale.reshape(rows, -1).repeat_interleave(spec.group_size, dim=-1)
    return scale.reshape(-1, 1)


def scaled_matmul(
    xc: torch.Tensor, wc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """`sum_k (xc * x_scale)[m, k] * (wc * w_scale)[n, k]` in float64: integer-valued `xc`
    (M, K) and `wc` (N, K), each column with its own scale (broadcast to the operand).

    A code times an fp32 scale is exact in float64 (8 + 24 bits < 53), so each term is rounded
    once (2^-53) and the sum is float64's: within ~1e-15 of summing each group's exact integer
    product times its scales, eight orders below the fp32 the layer returns.

    Example:
        >>> x, w = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
        >>> scaled_matmul(x, w, torch.tensor([[0.5, 0.25]]), torch.tensor([[2.0]])).item()
        7.0
    """
    return (xc * x_scale) @ (wc * w_scale).T  # (M, N)
