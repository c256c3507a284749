"""`IntLinear`: an integer `nn.Linear`, and `integer_matmul` / `grouped_matmul`, its GEMMs.

With a quantized input and weight the layer computes with integers: the input is quantized to
codes with `grid.quantize` (division, half-to-even, as in training), then
`sum (q_x - z_x) * (q_w - z_w)` is accumulated in float64, which is exact for integer-valued
operands while partial sums stay below 2^53 (an int32 accumulator's range is far below that),
then `* s_x * s_w + bias` and the cast to fp32. Per-group weights accumulate each group apart
and apply that group's scale; so do per-group (dynamic) inputs, each group of a row with its
own input scale. Weight-only layers dequantize the weight (bit-identical to the
fake-quantized weight of training) and run the float op; so do layers whose weight stayed float.
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
        else:  # each group's products take its own scales: (G, M, 1) and (G, 1, N)
            g_x = (s_x.to(torch.float64).reshape(-1, k // group).T[:, :, None]
                   if xs.granularity == "per_group"
                   else s_x.to(torch.float64).reshape(1, -1, 1))  # fmt: skip
            g_w = s_w.T[:, None, :] if ws.granularity == "per_group" else s_w
            acc = grouped_matmul(xc, self.centered_weight(), group, g_x, g_w)
            y = self.finish(acc, torch.ones((), dtype=torch.float64), -1)
        return y.reshape(*lead, self.out_features)


def integer_matmul(xc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
    """Exact `xc @ wc.T` for integer-valued float64 `xc` (M, K) and `wc` (N, K).

    Float64 holds every integer below 2^53 exactly, so every partial sum is exact while
    K * max|product| < 2^53 (products of 8-bit codes are below 2^16: K up to 2^37), far beyond
    where an int32 accumulator (the contract's reference) would overflow.
    """
    return xc @ wc.T  # (M, N)


def grouped_matmul(
    xc: torch.Tensor,
    wc: torch.Tensor,
    group_size: int,
    s_x: torch.Tensor,
    s_w: torch.Tensor,
    max_bytes: int = 1 << 28,
) -> torch.Tensor:
    """`sum_g (xc_g @ wc_g.T) * s_x[g] * s_w[g]` over groups of `group_size` columns, each
    group's product exact (`integer_matmul`), in float64. `s_x` broadcasts to (G, M, 1), `s_w`
    to (G, 1, N). Groups go in chunks whose (chunk, M, N) products stay under `max_bytes`:
    a 49k-row output matrix over 1,024 tokens would otherwise hold GBs per call."""
    m, n, groups = xc.shape[0], wc.shape[0], xc.shape[-1] // group_size
    xg = xc.reshape(m, groups, group_size).transpose(0, 1)  # (G, M, g)
    wg = wc.reshape(n, groups, group_size).permute(1, 2, 0)  # (G, g, N)

    def part(s: torch.Tensor, j: slice) -> torch.Tensor:  # a scale shared by all groups: whole
        return s[j] if s.ndim == 3 and s.shape[0] == groups else s

    step = max(1, max_bytes // (8 * m * n + 1))
    out = torch.zeros(m, n, dtype=torch.float64)
    for i in range(0, groups, step):
        j = slice(i, i + step)
        out += (torch.matmul(xg[j], wg[j]) * part(s_x, j) * part(s_w, j)).sum(0)
    return out
