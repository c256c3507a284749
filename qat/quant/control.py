"""Switches usable with `model.apply(fn)`: fake quant, observers, BatchNorm statistics; and
`frozen_eval`, which holds a model still for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from qat.quant.fake_quant import FakeQuantizer


def enable_fake_quant(mod: nn.Module) -> None:
    if isinstance(mod, FakeQuantizer):
        mod.fake_quant_enabled.fill_(True)


def disable_fake_quant(mod: nn.Module) -> None:
    if isinstance(mod, FakeQuantizer):
        mod.fake_quant_enabled.fill_(False)


def enable_observer(mod: nn.Module) -> None:
    if isinstance(mod, FakeQuantizer):
        mod.observer_enabled.fill_(True)


def disable_observer(mod: nn.Module) -> None:
    """Freeze the observer: scales stay where they are (learned ones keep learning)."""
    if isinstance(mod, FakeQuantizer):
        mod.observer_enabled.fill_(False)


freeze_observer = disable_observer


def freeze_bn_stats(mod: nn.Module) -> None:
    """Simulated-fold layers switch to running statistics (no more updates)."""
    if hasattr(mod, "bn_frozen"):
        mod.bn_frozen.fill_(True)


def unfreeze_bn_stats(mod: nn.Module) -> None:
    if hasattr(mod, "bn_frozen"):
        mod.bn_frozen.fill_(False)


def quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Every `FakeQuantizer` in `model` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantizer)}


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """For the block, `model` in eval mode with every observer off (no scale can move);
    modes and switches restored after."""
    modes = [(m, m.training) for m in model.modules()]
    observing = [(q, q.observer_enabled.clone()) for q in quantizers(model).values()]
    try:
        model.eval()
        model.apply(disable_observer)
        yield model
    finally:
        for q, on in observing:
            q.observer_enabled.copy_(on)
        for m, training in modes:
            m.training = training
