"""The quantization core: pure torch, no Lightning or Hydra."""

from qat.quant.calibrate import apply_schedule, calibrate
from qat.quant.control import (
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    freeze_bn_stats,
    freeze_observer,
    quantizers,
    unfreeze_bn_stats,
)
from qat.quant.fake_quant import FakeQuantizer, fake_quantize
from qat.quant.observers import NonFiniteInputError, build_observer
from qat.quant.plan import Plan, plan
from qat.quant.prepare import is_prepared, prepare
from qat.quant.recipe import Recipe, Schedule
from qat.quant.spec import QuantSpec

__all__ = [
    "FakeQuantizer",
    "NonFiniteInputError",
    "Plan",
    "QuantSpec",
    "Recipe",
    "Schedule",
    "apply_schedule",
    "build_observer",
    "calibrate",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
    "fake_quantize",
    "freeze_bn_stats",
    "freeze_observer",
    "is_prepared",
    "plan",
    "prepare",
    "quantizers",
    "unfreeze_bn_stats",
]
