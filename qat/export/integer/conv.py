"""`IntConv1d`, `IntConv2d`: integer convolutions (BatchNorm folded in), with the numerics of
`IntLinear` (exact float64 accumulation of centered codes, then the scales and the bias)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.export.integer.layer import IntLayer
from qat.quant.modules import QATConv2d
from qat.quant.spec import QuantSpec

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

    @classmethod
    def from_qat(cls, mod, weight_spec, input_spec, output_spec) -> _IntConvNd:
        padding = mod.padding if isinstance(mod.padding, str) else list(mod.padding)
        return cls(
            mod.in_channels, mod.out_channels, list(mod.kernel_size), list(mod.stride), padding,
            list(mod.dilation), mod.groups, mod.padding_mode, mod.export_bias() is not None,
            weight_spec, input_spec, output_spec,
        )  # fmt: skip

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
