"""Post-training quantization on the recipe's grid: GPTQ (and round-to-nearest, which is
calibration alone). Pure torch, no Lightning or Hydra."""

from qat.ptq.gptq import GPTQConfig, gptq_quantize
from qat.ptq.runner import GPTQReport, apply_gptq

__all__ = ["GPTQConfig", "GPTQReport", "apply_gptq", "gptq_quantize"]
