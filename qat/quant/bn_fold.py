"""Conv-BatchNorm folding: simulated during QAT (`fold`) or merged before it (`merge`).

Simulated folding follows Jacob et al. 2018 / Krishnamoorthi 2018 (and torch.ao's ConvBn):
the weight that gets fake-quantized is `w * gamma / sqrt(running_var + eps)`; the conv output
is scaled back and normalized with batch statistics while BN trains, so batch statistics still
drive training, and with running statistics once BN is frozen (and in eval), where the layer
computes exactly `conv(x, fq(w_folded)) + b_folded`: what the exported integer conv computes.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.modules import QATConv1d, QATConv2d
from qat.quant.spec import QuantSpec

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """`gamma / sqrt(running_var + eps)`, per output channel."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    return inv_std if bn.weight is None else bn.weight * inv_std


def folded_bias(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """`beta + (b - running_mean) * gamma / std`."""
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    return beta + (b - bn.running_mean) * bn_scale(bn)


def _per_out(t: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape)


@torch.no_grad()
def merge_bn(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold `bn`'s running statistics into `conv` in place (the `merge` mode)."""
    scale = bn_scale(bn)
    bias = folded_bias(conv, bn)
    conv.weight.mul_(_per_out(scale, conv.weight.ndim, 0))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.clone())
    else:
        conv.bias.copy_(bias)


class _ConvBnMixin:
    bn: nn.modules.batchnorm._BatchNorm

    @classmethod
    def from_conv_bn(
        cls,
        conv: nn.Module,
        bn: nn.modules.batchnorm._BatchNorm,
        weight: QuantSpec | None = None,
        input: QuantSpec | None = None,  # noqa: A002
        output: QuantSpec | None = None,
        name: str = "",
    ) -> nn.Module:
        """Fuse `conv` and its `bn` (parameters shared) into one fake-quant layer."""
        new = cls.from_float(conv, weight, input, output, name)
        new.bn = bn
        new.register_buffer("bn_frozen", torch.tensor(False))
        return new

    def export_weight(self) -> torch.Tensor:
        # The weight simulated folding quantized (running statistics, as in eval).
        return self.folded_weight()

    def export_bias(self) -> torch.Tensor:
        return self.folded_bias()

    def fold_scale(self) -> torch.Tensor:
        """`gamma / std` per output channel, shaped to multiply the weight."""
        return _per_out(bn_scale(self.bn), self.weight.ndim, 0)

    def folded_weight(self) -> torch.Tensor:
        return self.float_weight() * self.fold_scale()

    def quantized_weight(self) -> torch.Tensor:
        return self._qweight(self.folded_weight())

    def folded_bias(self) -> torch.Tensor:
        return folded_bias(self, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._qin(x)
        bn = self.bn
        scale = self.fold_scale()
        w = self.float_weight()
        wq = self._qweight(w * scale)  # quantized_weight(), with `scale` kept
        if not self.training or bool(self.bn_frozen):
            # Running statistics (BN frozen, or eval): exactly the exported layer. The same
            # function as scaling back and calling BN in eval mode, with fewer passes.
            return self._qout(self._conv_forward(x, wq, self._qbias(folded_bias(self, bn))))
        # Batch statistics drive BN (and update its running statistics). Scaling the
        # quantized weight back per output channel equals scaling the conv output back
        # (conv is linear in the weight) and touches C_out*k values, not every activation.
        y = self._conv_forward(x, wq / scale, self.bias)
        was = bn.training
        bn.training = True
        try:
            y = bn(y)
        finally:
            bn.training = was
        return self._qout(y)


class QATConvBn1d(_ConvBnMixin, QATConv1d):
    """Conv1d + BatchNorm1d with simulated folding (see module docstring)."""


class QATConvBn2d(_ConvBnMixin, QATConv2d):
    """Conv2d + BatchNorm2d with simulated folding (see module docstring).

    Example:
        >>> from qat.quant import QuantSpec
        >>> m = QATConvBn2d.from_conv_bn(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4),
        ...                              weight=QuantSpec(bits=4, granularity="per_channel"))
        >>> m(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 4, 6, 6])
    """

