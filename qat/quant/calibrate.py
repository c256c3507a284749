"""Calibration (observers on, fake quant off, no weight updates) and schedule states."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qat.quant.control import quantizers
from qat.quant.tokens import observe_real_tokens


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    token_mask: Callable[[Any], torch.Tensor | None] | None = None,
) -> int:
    """Run up to `num_batches` batches in eval mode with observers on and fake quant off.
    `token_mask(batch)`, for padded batches, gives the (B, T) mask of real tokens: activation
    observers see only those (`observe_real_tokens`).

    Static quantizers (and learned ones, which take their initial scale from the observer)
    end up calibrated; fake quant is switched on afterwards. Returns the batches used.

    Example:
        >>> import qat
        >>> m = qat.prepare(nn.Linear(4, 2), {"rules": []})
        >>> calibrate(m, [torch.randn(3, 4)], num_batches=1)
        1
    """
    forward = forward or (lambda m, b: m(b))
    was_training = model.training
    qs = quantizers(model).values()
    for q in qs:
        q.observer_enabled.fill_(True)
        q.fake_quant_enabled.fill_(False)
    model.eval()  # BN uses running statistics; the quantizers alone observe (train mode)
    for q in qs:
        q.train()
    used = 0
    for batch in batches:
        if used >= num_batches:
            break
        with observe_real_tokens(model, token_mask(batch) if token_mask else None):
            forward(model, batch)
        used += 1
        if used == 1:  # weights do not change while calibrating: one look is enough
            for q in qs:
                if q.role == "weight" and not q.observer.accumulate:
                    q.observer_enabled.fill_(False)
    for q in qs:
        q.fake_quant_enabled.fill_(True)
        q.observer_enabled.fill_(True)
    model.train(was_training)
    return used


def apply_schedule(
    model: nn.Module, step: int, steps: dict[str, int | None], weight_observers: bool = True
) -> None:
    """Set observer / BN switches for optimizer step `step` (idempotent, so resume-safe).

    `steps` comes from `Schedule.steps(total)`: observers freeze at `freeze_observers`, BN
    statistics at `freeze_bn`. Fake quant is on throughout training (calibration precedes it).
    `weight_observers=False` keeps weight scales where they are (GPTQ chose the codes on them).
    """
    fo, fb = steps.get("freeze_observers"), steps.get("freeze_bn")
    obs_on = fo is None or step < fo
    bn_frozen = fb is not None and step >= fb
    for q in quantizers(model).values():
        q.observer_enabled.fill_(obs_on and (weight_observers or q.role != "weight"))
        q.fake_quant_enabled.fill_(True)
    for m in model.modules():
        if hasattr(m, "bn_frozen"):
            m.bn_frozen.fill_(bn_frozen)
