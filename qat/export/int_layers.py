"""Integer layers: `IntLinear`, `IntConv1d`, `IntConv2d`, `IntEmbedding`.

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
from torch import nn

from qat.export import packing
from qat.export.int_base import IntLayer
from qat.quant.modules import QATConv2d, QATLinear
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


_CONV_ARGS = ("stride", "padding", "dilation", "groups", "padding_mode")


class _IntConvNd(IntLayer):
    N_DIM: int
    FLOAT_TYPE: type[nn.Module]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int] | str,
        dilation: list[int],
        groups: int = 1,
        padding_mode: str = "zeros",
        bias: bool = True,
        weight_spec: QuantSpec | None = None,
        input_spec: QuantSpec | None = None,
        output_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        # A meta-device float conv resolves the padding rules (incl. "same") like torch does.
        ref = self.FLOAT_TYPE(
            in_channels, out_channels, tuple(kernel_size), tuple(stride),
            padding if isinstance(padding, str) else tuple(padding), tuple(dilation), groups,
            bias, padding_mode, device="meta",
        )  # fmt: skip
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = ref.kernel_size, ref.stride, ref.dilation
        self.padding, self.groups, self.padding_mode = ref.padding, groups, padding_mode
        self._pad_twice = ref._reversed_padding_repeated_twice
        shape = (out_channels, in_channels // groups, *ref.kernel_size)
        self._init_quant_state(shape, weight_spec, input_spec, output_spec, bias)
        self.check_integer_layout(type(self).__name__, QATConv2d.INTEGER_INPUTS)

    def layer_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "bias": self.bias is not None,
        }
        for k in _CONV_ARGS:
            v = getattr(self, k)
            args[k] = list(v) if isinstance(v, tuple) else v
        return args

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.N_DIM == 1 else F.conv2d
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad_twice, mode=self.padding_mode)
            return conv(x, w, None, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_spec is None or self.input_spec is None:
            y = self._conv(self.fake_quant_act("input", x), self.dequantized_weight())
            if self.bias is not None:
                y = y + self.bias.reshape(-1, *[1] * self.N_DIM)
        else:
            y = self._integer_forward(x)
        return self.fake_quant_act("output", y)

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s_x, z_x = self.quantize_act("input", x)
        # Zero padding of centered codes is the zero padding of the dequantized input.
        xc = q.to(torch.float64) - z_x.to(torch.float64)
        wc = self.centered_weight()  # (O, C/groups, *k)
        s_w = self.weight_scale.to(torch.float64)
        ws = self.weight_spec
        spatial = [1] * self.N_DIM
        if ws.granularity != "per_group":
            acc = self._conv(xc, wc)  # (B, O, *S), exact
            scale = s_x.to(torch.float64) * (s_w.reshape(-1, *spatial) if s_w.ndim else s_w)
            return self.finish(acc, scale, channel_dim=1)
        # Per group: one masked copy of each output channel's weight per group, ordered
        # (O, G) so that conv groups keep their contiguous output channels.
        o, groups = s_w.shape
        flat = wc.reshape(o, groups, -1)  # (O, G, g)
        eye = torch.eye(groups, dtype=torch.float64)
        expanded = flat[:, None, :, :] * eye[None, :, :, None]  # (O, G, G, g)
        w_exp = expanded.reshape(o * groups, *wc.shape[1:])
        acc = self._conv(xc, w_exp)  # (B, O*G, *S), exact per group
        acc = acc.unflatten(1, (o, groups)) * s_w.reshape(1, o, groups, *spatial)
        return self.finish(acc.sum(2), s_x.to(torch.float64), channel_dim=1)


class IntConv1d(_IntConvNd):
    """Integer `nn.Conv1d` (see `IntConv2d`)."""

    N_DIM = 1
    FLOAT_TYPE = nn.Conv1d


class IntConv2d(_IntConvNd):
    """Integer `nn.Conv2d`: BatchNorm already folded in for `bn: fold` / `merge`.

    Example:
        >>> conv = IntConv2d(1, 4, [3, 3], [1, 1], [1, 1], [1, 1],
        ...                  weight_spec=QuantSpec(bits=8, granularity="per_channel"),
        ...                  input_spec=QuantSpec(bits=8, symmetric=False))
        >>> conv(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    N_DIM = 2
    FLOAT_TYPE = nn.Conv2d


class IntEmbedding(IntLayer):
    """Integer `nn.Embedding`: gathers code rows and dequantizes them (as training did).

    Example:
        >>> emb = IntEmbedding(10, 4, weight_spec=QuantSpec(bits=4, granularity="per_channel"))
        >>> emb(torch.tensor([[1, 2]])).shape
        torch.Size([1, 2, 4])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        weight_spec: QuantSpec | None = None,
        input_spec: None = None,
        output_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        if input_spec is not None:
            raise ValueError("IntEmbedding: the input is integer indices; input_spec must be None")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        shape = (num_embeddings, embedding_dim)
        self._init_quant_state(shape, weight_spec, None, output_spec, bias=False)

    def layer_args(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
        }

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        ws = self.weight_spec
        if ws is None:
            return self.fake_quant_act("output", F.embedding(idx, self.float_weight))
        d = self.embedding_dim
        rows = self.weight_codes[idx]  # (*idx, D) or packed (*idx, ceil(D/2))
        q = packing.unpack_int4(rows, d, ws.symmetric) if packing.is_packed(ws) else rows
        s, z = self.weight_qparams()
        g = ws.granularity
        v = q.float()
        if g == "per_group":
            v = v.unflatten(-1, (-1, ws.group_size))  # (*idx, G, g)
            s, z = s[idx][..., None], z[idx][..., None]
        elif g == "per_channel" and ws.axis % 2 == 0:
            s, z = s[idx][..., None], z[idx][..., None]
        # Same expression as grid.dequantize: (q - z) * s in fp32.
        y = ((v - z) * s).reshape(*idx.shape, d)
        return self.fake_quant_act("output", y)
