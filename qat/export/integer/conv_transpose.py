"""`IntConvTranspose2d`: an integer `nn.ConvTranspose2d` (decoders, U-Nets).

With a quantized input and weight: the transposed convolution of the centered input codes with
the centered weight codes in float64 (exact, as for `IntConv2d`), then `* s_x * s_w` (per
output channel: the weight's axis 1) and the bias. Weight-only layers run the float op on the
dequantized weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qat.export.integer.layer import IntLayer
from qat.quant.modules import QATConvTranspose2d
from qat.quant.spec import QuantSpec


class IntConvTranspose2d(IntLayer):
    """Integer `nn.ConvTranspose2d`.

    Example:
        >>> up = IntConvTranspose2d(4, 2, [2, 2], [2, 2], [0, 0], [0, 0], [1, 1],
        ...     weight_spec=QuantSpec(bits=8, granularity="per_channel", axis=1),
        ...     input_spec=QuantSpec(bits=8, symmetric=False))
        >>> up(torch.randn(1, 4, 3, 3)).shape
        torch.Size([1, 2, 6, 6])
    """

    N_DIM = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int],
        output_padding: list[int],
        dilation: list[int],
        groups: int = 1,
        bias: bool = True,
        weight_spec: QuantSpec | None = None,
        input_spec: QuantSpec | None = None,
        output_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.output_padding = tuple(padding), tuple(output_padding)
        self.dilation = tuple(dilation)
        shape = (in_channels, out_channels // groups, *self.kernel_size)
        self._init_quant_state(shape, weight_spec, input_spec, output_spec, bias, out_channels)
        self.check_integer_layout(type(self).__name__, QATConvTranspose2d.INTEGER_INPUTS,
                                  QATConvTranspose2d.OUTPUT_AXIS)  # fmt: skip

    @classmethod
    def from_qat(cls, mod, weight_spec, input_spec, output_spec) -> IntConvTranspose2d:
        return cls(
            mod.in_channels, mod.out_channels, list(mod.kernel_size), list(mod.stride),
            list(mod.padding), list(mod.output_padding), list(mod.dilation), mod.groups,
            mod.export_bias() is not None, weight_spec, input_spec, output_spec,
        )  # fmt: skip

    def layer_args(self) -> dict[str, Any]:
        args = {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "groups": self.groups, "bias": self.bias is not None}  # fmt: skip
        for key in ("kernel_size", "stride", "padding", "output_padding", "dilation"):
            args[key] = list(getattr(self, key))
        return args

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, w, None, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_spec is None or self.input_spec is None:
            y = self._conv(self.fake_quant_act("input", x), self.dequantized_weight())
            if self.bias is not None:
                y = y + self.bias.reshape(-1, 1, 1)
            return self.fake_quant_act("output", y)
        q, s_x, z_x = self.quantize_act("input", x)
        acc = self._conv(q.to(torch.float64) - z_x.to(torch.float64), self.centered_weight())
        s_w = self.weight_scale.to(torch.float64)
        if s_w.ndim:  # axis 1 of a grouped weight is the channel within each group
            s_w = s_w.repeat(self.groups).reshape(1, -1, 1, 1)
        scale = s_x.to(torch.float64) * s_w
        return self.fake_quant_act("output", self.finish(acc, scale, channel_dim=1))
