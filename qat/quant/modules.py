"""Fake-quant layers: subclasses of the float layers that share their parameters.

`forward` is: fake-quantize the input, fake-quantize the weight, call the functional op,
fake-quantize the output. A quantizer that the recipe does not ask for is absent (`None`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant import grid
from qat.quant.fake_quant import FakeQuantizer
from qat.quant.lora import LoRA
from qat.quant.spec import QuantSpec


class QATMixin:
    """Adds `weight_quant`, `input_quant`, `output_quant` to a float layer."""

    weight_quant: FakeQuantizer | None
    input_quant: FakeQuantizer | None
    output_quant: FakeQuantizer | None
    lora: LoRA | None  # adapters merged into the weight before quantization (`attach_lora`)
    qat_name: str  # the layer's module path, for error messages
    FLOAT_TYPE: type[nn.Module]
    # Input granularities the integer layer can factor out of its dot products.
    INTEGER_INPUTS: tuple[str, ...] = ("per_tensor",)
    OUTPUT_AXIS = 0  # the weight's output-channel dim (per-channel scales must lie along it)
    # Activations laid out (..., features), so (B, T, features) in a token batch: their padded
    # tokens can be told apart (`qat.quant.tokens`). Convolutions are channels-first.
    FEATURES_LAST = True

    @staticmethod
    def weight_shapes(mod: nn.Module) -> list[tuple[int, ...]]:
        """Shapes of the float module's weights this class quantizes (checked at `plan`)."""
        return [tuple(mod.weight.shape)]

    @staticmethod
    def activation_widths(mod: nn.Module) -> dict[str, int | None]:
        """Last-dim sizes of the float module's input and output where they are fixed (None:
        they vary); per-group activations group along it (checked at `plan`)."""
        return {"input": None, "output": None}

    @classmethod
    def from_float(
        cls,
        mod: nn.Module,
        weight: QuantSpec | None = None,
        input: QuantSpec | None = None,  # noqa: A002 - the recipe's key
        output: QuantSpec | None = None,
        name: str = "",
    ) -> nn.Module:
        """A fake-quant copy of `mod` sharing its parameters and buffers (same objects)."""
        if isinstance(mod, QATMixin):
            raise ValueError(f"{name or type(mod).__name__} is already prepared for QAT")
        new = cls.__new__(cls)
        new.__dict__ = dict(mod.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            new.__dict__[key] = dict(mod.__dict__[key])
        new._init_quantizers(weight, input, output, name)
        return new

    def _init_quantizers(self, weight, input, output, name):  # noqa: A002
        self.qat_name = name
        self.lora = None
        w_shape = tuple(self.weight.shape)
        self.weight_quant = self._make(weight, "weight", w_shape, f"{name}.weight_quant")
        self.input_quant = self._make(input, "input", None, f"{name}.input_quant")
        self.output_quant = self._make(output, "output", None, f"{name}.output_quant")

    @staticmethod
    def _make(spec, role, shape, name):
        return None if spec is None else FakeQuantizer(spec, role=role, shape=shape, name=name)

    def float_weight(self) -> torch.Tensor:
        """The weight before quantization: the parameter, with the LoRA update merged in."""
        return self.weight if self.lora is None else self.lora.merge(self.weight)

    def lora_shape(self) -> tuple[int, int]:
        """`(rows, cols)` of the weight as a LoRA update sees it (output dim first)."""
        return self.weight.shape[0], self.weight[0].numel()

    def export_weight(self) -> torch.Tensor:
        """The float weight `convert` quantizes into integer codes (LoRA merged, folded BN
        included)."""
        return self.float_weight()

    def export_bias(self) -> torch.Tensor | None:
        """The float bias the integer layer adds (folded BN included), or None."""
        return getattr(self, "bias", None)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (fake-quantized when a weight spec is set)."""
        return self._qweight(self.float_weight())

    def _qweight(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.weight_quant is None else self.weight_quant(w)

    def _qin(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def _qout(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_quant is None else self.output_quant(y)

    def _qbias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        """The bias on its int32 grid of steps `s_x * s_w` (`grid.bias_on_grid`), as the
        integer layer adds it, with a straight-through gradient; unchanged otherwise and
        while either quantizer is off (calibration)."""
        scale = self.bias_scale(b)
        if scale is None:
            return b
        on_grid = grid.dequantize_bias(grid.quantize_bias(b, scale), scale, b.dtype)
        return b + (on_grid - b).detach()

    def bias_scale(self, b: torch.Tensor | None) -> torch.Tensor | None:
        """`s_x * s_w` per output channel where bias `b` lies on the int32 grid, else None."""
        wq, iq = self.weight_quant, self.input_quant
        if b is None or wq is None or iq is None or not grid.bias_on_grid(wq.spec, iq.spec):
            return None
        if not (wq.fake_quant_enabled and iq.fake_quant_enabled and iq.calibrated):
            return None
        return grid.bias_scale(iq.qparams()[0], wq.qparams()[0], b.numel())

    def to_float(self) -> nn.Module:
        """The float layer again, sharing parameters (quantizers dropped)."""
        if self.lora is not None:
            raise ValueError(f"{self.qat_name}: has LoRA adapters; `convert` merges them")
        new = self.FLOAT_TYPE.__new__(self.FLOAT_TYPE)
        new.__dict__ = dict(self.__dict__)
        new._modules = {
            k: v
            for k, v in self._modules.items()
            if k not in ("weight_quant", "input_quant", "output_quant")
        }
        return new


class QATLinear(QATMixin, nn.Linear):
    """`nn.Linear` with fake-quantized weight and activations.

    Example:
        >>> from qat.quant import QuantSpec
        >>> lin = QATLinear.from_float(nn.Linear(8, 4), weight=QuantSpec(bits=4), name="fc")
        >>> lin(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    FLOAT_TYPE = nn.Linear
    # A scale per row of the matmul, or per row and group of `group_size` columns.
    INTEGER_INPUTS = ("per_tensor", "per_token", "per_group")

    @staticmethod
    def activation_widths(mod: nn.Linear) -> dict[str, int | None]:
        return {"input": mod.in_features, "output": mod.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qout(F.linear(self._qin(x), self.quantized_weight(), self._qbias(self.bias)))


class _QATConv(QATMixin):
    FEATURES_LAST = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight(), self._qbias(self.bias)
        return self._qout(self._conv_forward(self._qin(x), w, b))


class QATConv1d(_QATConv, nn.Conv1d):
    """`nn.Conv1d` with fake-quantized weight and activations (see `QATLinear`)."""

    FLOAT_TYPE = nn.Conv1d


class QATConv2d(_QATConv, nn.Conv2d):
    """`nn.Conv2d` with fake-quantized weight and activations (see `QATLinear`)."""

    FLOAT_TYPE = nn.Conv2d


class QATConvTranspose2d(QATMixin, nn.ConvTranspose2d):
    """`nn.ConvTranspose2d` with fake-quantized weight and activations.

    Its weight is `(in, out / groups, kH, kW)`: per-channel weight scales for the integer
    path lie along axis 1 (`axis: 1` in the recipe; with groups, one scale per channel within a
    group). Training may pass `output_size`; the exported layer takes no such argument and
    keeps the module's `output_padding`.

    Example:
        >>> from qat.quant import QuantSpec
        >>> up = QATConvTranspose2d.from_float(nn.ConvTranspose2d(4, 2, 2, stride=2),
        ...     weight=QuantSpec(bits=8, granularity="per_channel", axis=1), name="up")
        >>> up(torch.randn(1, 4, 3, 3)).shape, tuple(up.weight_quant.scale.shape)
        (torch.Size([1, 2, 6, 6]), (2,))
    """

    FLOAT_TYPE = nn.ConvTranspose2d
    FEATURES_LAST = False
    OUTPUT_AXIS = 1

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                   2, self.dilation)  # fmt: skip
        w, b = self.quantized_weight(), self._qbias(self.bias)
        y = F.conv_transpose2d(self._qin(x), w, b, self.stride, self.padding, pad, self.groups,
                               self.dilation)  # fmt: skip
        return self._qout(y)


class QATEmbedding(QATMixin, nn.Embedding):
    """`nn.Embedding` with a fake-quantized table (per row or per group); indices stay integer."""

    FLOAT_TYPE = nn.Embedding

    @staticmethod
    def activation_widths(mod: nn.Embedding) -> dict[str, int | None]:
        return {"input": None, "output": mod.embedding_dim}

    def _init_quantizers(self, weight, input, output, name):  # noqa: A002
        if input is not None:
            raise ValueError(f"{name}: an Embedding's input is integer indices; drop `input`")
        super()._init_quantizers(weight, None, output, name)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        y = F.embedding(
            idx,
            w,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
        return self._qout(y)
