"""transformers' `Conv1D` (GPT-2's attention and MLP matrices) as a fake-quant layer.

`Conv1D` is a linear layer whose weight is stored `(in, out)`; `forward` computes
`x @ W + b`. The fake-quant layer quantizes the `(out, in)` view `W.T`, so a recipe's
`per_channel` (axis 0) means one scale per output feature and `per_group` groups run along the
input, exactly as for `nn.Linear`, and the integer layer is an `IntLinear`. This module imports
`transformers`; `qat.export.families.shipped` loads it only where transformers is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from qat.quant.modules import QATLinear, QATMixin


class QATConv1D(QATMixin, Conv1D):
    """transformers `Conv1D` with fake-quantized weight (as `(out, in)`) and activations.

    Example:
        >>> from qat.quant import QuantSpec
        >>> lin = QATConv1D.from_float(Conv1D(6, 4), weight=QuantSpec(bits=4), name="c_attn")
        >>> lin(torch.randn(2, 4)).shape, tuple(lin.export_weight().shape)
        (torch.Size([2, 6]), (6, 4))
    """

    FLOAT_TYPE = Conv1D
    INTEGER_INPUTS = QATLinear.INTEGER_INPUTS

    @staticmethod
    def weight_shapes(mod: Conv1D) -> list[tuple[int, ...]]:
        return [(mod.weight.shape[1], mod.weight.shape[0])]  # the (out, in) view quantized

    @staticmethod
    def activation_widths(mod: Conv1D) -> dict[str, int | None]:
        return {"input": mod.weight.shape[0], "output": mod.weight.shape[1]}

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def _init_quantizers(self, weight, input, output, name):  # noqa: A002
        super()._init_quantizers(None, input, output, name)
        shape = (self.out_features, self.in_features)
        self.weight_quant = self._make(weight, "weight", shape, f"{name}.weight_quant")

    def float_weight(self) -> torch.Tensor:
        """The `(out, in)` view (LoRA merged): the weight as the quantizer sees it."""
        w = self.weight.t()
        return w if self.lora is None else self.lora.merge(w)

    def lora_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def quantized_weight(self) -> torch.Tensor:
        return self._qweight(self.float_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qout(F.linear(self._qin(x), self.quantized_weight(), self._qbias(self.bias)))
