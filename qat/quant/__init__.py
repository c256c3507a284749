"""The quantization core: pure torch, no Lightning or Hydra."""

from qat.quant.fake_quant import FakeQuantizer, fake_quantize
from qat.quant.observers import NonFiniteInputError, build_observer
from qat.quant.spec import QuantSpec

__all__ = ["FakeQuantizer", "NonFiniteInputError", "QuantSpec", "build_observer", "fake_quantize"]
