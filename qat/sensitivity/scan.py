"""Measure what quantizing each group of layers costs, one group at a time.

For each candidate width (bits, and optionally a group size) the caller passes the model
prepared with the recipe at that width and calibrated. All fake quant is switched off, so the
model computes in float; then each group's weight quantizers are switched on alone and the
model is evaluated. Activations stay float during the scan, or with `activations` at the
recipe's quantizers throughout (where 4-bit activations carry the error, a weight's cost beside
them is what counts): it ranks weights, and the written recipe keeps the base recipe's
activation specs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from qat.export.integer.packing import weight_bytes
from qat.quant.control import disable_fake_quant, quantizers
from qat.quant.modules import QATMixin
from qat.sensitivity.width import Width

MEASURES = ("loss", "kl", "sqnr")


@dataclass
class Group:
    """One group of layers scanned together; per candidate bit width its artifact bytes,
    weight SQNR (dB) and measured cost (`delta`: the loss change, the KL divergence from the
    float outputs, or the sqnr proxy's weight-count-weighted noise-to-signal ratio)."""

    name: str
    layers: list[str]
    weights: int
    bytes: dict[Width, int] = field(default_factory=dict)
    sqnr: dict[Width, float] = field(default_factory=dict)
    delta: dict[Width, float] = field(default_factory=dict)


def group_name(layer: str, by: str) -> str:
    """The group of `layer`: itself (`by="layer"`), or its block, the name up to its first
    numeric part (`blocks.3.attn.q_proj` -> `blocks.3`; `by="block"`).

    Example:
        >>> group_name("model.layers.3.mlp.up_proj", "block"), group_name("lm_head", "block")
        ('model.layers.3', 'lm_head')
    """
    if by == "layer":
        return layer
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return layer


def _weights(model: nn.Module, names: list[str]) -> list[QATMixin]:
    mods = dict(model.named_modules())
    return [mods[n] for n in names]


@torch.no_grad()
def _sqnr(mod: QATMixin) -> tuple[float, float]:
    """Weight signal and quantization-noise power."""
    w = mod.weight.detach().float()
    q = mod.weight_quant(mod.weight.detach()).float()
    return float(w.square().sum()), float((w - q).square().sum())


def _switch(mods: list[QATMixin], on: bool) -> None:
    for m in mods:
        m.weight_quant.fake_quant_enabled.fill_(on)


@torch.no_grad()
def _measure(g: Group, width: Width, mods: list[QATMixin], model: nn.Module,
             evaluate: Callable[[nn.Module], float], base: float, measure: str,
             total: int) -> None:  # fmt: skip
    """Group `g`'s bytes, SQNR and cost at `width`, its weights `mods` of `model` quantized."""
    g.bytes[width] = sum(weight_bytes(m.weight_quant.spec, tuple(m.weight.shape)) for m in mods)
    _switch(mods, True)
    signal, noise = map(sum, zip(*(_sqnr(m) for m in mods), strict=True))
    g.sqnr[width] = 10 * torch.log10(torch.tensor(signal / max(noise, 1e-30))).item()
    if measure != "sqnr":  # the loss, or the KL from the float outputs
        g.delta[width] = float(evaluate(model)) - base
    else:  # noise-to-signal weighted by the group's share of the weights
        g.delta[width] = noise / max(signal, 1e-30) * g.weights / total
    _switch(mods, False)


@torch.no_grad()
def scan(
    models: dict[Width, nn.Module],
    layers: list[str],
    evaluate: Callable[[nn.Module], float],
    by: str = "layer",
    measure: str = "loss",
    progress: Callable[[int, int], None] | None = None,
    activations: bool = False,
) -> tuple[float, list[Group]]:
    """The float loss and, per group of `layers`, each width's bytes, SQNR and cost.
    `models[width]` is the calibrated model at `width`; `evaluate(model)` its validation loss.
    `activations`: the recipe's activation quantizers stay on throughout, so a group costs
    what its weights add beside them (the float loss is then the activations-only loss).

    Example:
        >>> import qat
        >>> def at(bits):
        ...     torch.manual_seed(0)
        ...     m = qat.prepare(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), {"rules": [
        ...         {"match": {"types": ["Linear"]}, "weight": {"bits": bits}}]})
        ...     _ = qat.quant.calibrate(m, [torch.randn(8, 16)], num_batches=1)
        ...     return m
        >>> x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
        >>> two, eight = Width(2), Width(8)
        >>> models = {two: at(2), eight: at(8)}
        >>> base, groups = scan(models, ["0", "1"], lambda m: m(x).square().mean())
        >>> [list(g.bytes.values()) for g in groups]
        [[68, 260], [20, 68]]
        >>> all(abs(g.delta[eight]) < abs(g.delta[two]) for g in groups)
        True
    """
    if measure not in MEASURES:
        raise ValueError(f"sensitivity.measure: got {measure!r}; allowed: {', '.join(MEASURES)}")
    names: dict[str, list[str]] = {}
    for layer in layers:
        names.setdefault(group_name(layer, by), []).append(layer)
    for m in models.values():
        m.eval().apply(disable_fake_quant)
        for q in quantizers(m).values() if activations else ():
            q.fake_quant_enabled.fill_(q.role != "weight")
    any_model = next(iter(models.values()))
    base = float(evaluate(any_model)) if measure != "sqnr" else 0.0
    total = sum(m.weight.numel() for m in _weights(any_model, layers))
    groups, done, steps = [], 0, len(names) * len(models)
    for name, members in names.items():
        g = Group(name, members, sum(m.weight.numel() for m in _weights(any_model, members)))
        seen: dict[tuple, Width] = {}  # the members' specs -> the width that measured them
        for width, model in sorted(models.items()):
            mods = _weights(model, members)
            specs = tuple(m.weight_quant.spec for m in mods)
            if specs in seen:  # a group size on layers that are not per-group: the same format
                w = seen[specs]
                g.bytes[width], g.sqnr[width], g.delta[width] = g.bytes[w], g.sqnr[w], g.delta[w]
            else:
                seen[specs] = width
                _measure(g, width, mods, model, evaluate, base, measure, total)
            done += 1
            if progress is not None:
                progress(done, steps)
        groups.append(g)
    return base, groups
