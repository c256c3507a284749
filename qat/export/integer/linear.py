"""`IntLinear`: an integer `nn.Linear`, and `integer_matmul`, the exact integer GEMM.

With a quantized input and weight the layer computes with integers: the input is quantized to
codes with `grid.quantize` (division, half-to-even, as in training), then
`sum (q_x - z_x) * (q_w - z_w)` is accumulated in float64, which is exact for integer-valued
operands while partial sums stay below 2^53 (an int32 accumulator's range is far below that),
then `* s_x * s_w + bias` and the cast to fp32. Per-group weights accumulate each group apart
and apply that group's scale. Weight-only layers dequantize the weight (bit-identical to the
fake-quantized weight of training) and run the float op; so do layers whose weight stayed float.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qat.export.integer.layer import IntLayer
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
        lead = x.shape[:-1]
        # Per-token scales have shape `lead`, per-tensor ones shape (): both broadcast as (M, 1).
        xc = (q.to(torch.float64) - z_x.to(torch.float64)[..., None]).reshape(-1, x.shape[-1])
        s_x = s_x.to(torch.float64).reshape(-1, 1)
        s_w = self.weight_scale.to(torch.float64)
        ws = self.weight_spec
        group = ws.group_size if ws.granularity == "per_group" else None
        acc = integer_matmul(xc, self.centered_weight(), group)
        if group is not None:
            y = self.finish((acc * s_w.T[:, None, :]).sum(0), s_x, channel_dim=-1)
        else:
            y = self.finish(acc, s_x * s_w, channel_dim=-1)
        return y.reshape(*lead, self.out_features)


def integer_matmul(
    xc: torch.Tensor, wc: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """Exact `xc @ wc.T` for integer-valued float64 `xc` (M, K) and `wc` (N, K).

    With `group_size`, one product per group of `group_size` columns: (K / group_size, M, N).
    Float64 holds every integer below 2^53 exactly, so every partial sum is exact while
    K * max|product| < 2^53 (products of 8-bit codes are below 2^16: K up to 2^37), far beyond
    where an int32 accumulator (the contract's reference) would overflow.
    """
    if group_size is None:
        return xc @ wc.T  # (M, N)
    groups = xc.shape[-1] // group_size
    xg = xc.reshape(-1, groups, group_size).transpose(0, 1)  # (G, M, g)
    wg = wc.reshape(-1, groups, group_size).permute(1, 2, 0)  # (G, g, N)
    return torch.matmul(xg, wg)  # (G, M, N)
