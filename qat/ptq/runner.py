"""GPTQ over a prepared (calibrated) model: every Linear and Conv2d weight, in call order.

Each layer's Hessian comes from its inputs as the layer sees them (after its own input
quantizer) on the calibration batches. Sequentially (the default) a layer is measured with the
layers before it already quantized and fake quant on; a stage is the layers called on the same
input tensor (q/k/v, gate/up), measured in one pass that stops as soon as its last layer has
seen the batch; inside a chain of repeated blocks (a transformer's layers) the pass runs
that block alone on its cached inputs (`blocks.py`). Otherwise the model runs once with fake
quant off and every layer sees float inputs. After GPTQ a layer's weight quantizer holds
GPTQ's scales with the observer off and turns its weight into GPTQ's codes: `convert` exports
exactly those codes. The weight itself keeps its float value wherever GPTQ kept
round-to-nearest's code (QAT from GPTQ starts there) and is the dequantized code elsewhere.

A BN-folded convolution is quantized (and exported) as `w * gamma / std` with BN's running
statistics: GPTQ chooses codes for that folded weight and the latent `w` is set so that folding
it gives them. Layers GPTQ does not walk keep round-to-nearest: embeddings, transposed, 1-d and
grouped convolutions, and weights shared with another module (a tied head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.ptq.blocks import block_plan, first_inputs, hidden
from qat.ptq.gptq import GPTQConfig, gptq_quantize
from qat.ptq.hessian import Hessian
from qat.quant import grid
from qat.quant.bn_fold import QATConvBn2d
from qat.quant.control import disable_fake_quant, enable_fake_quant
from qat.quant.modules import QATConv2d, QATLinear, QATMixin
from qat.quant.tokens import token_major

Forward = Callable[[nn.Module, Any], Any]
TokenMask = Callable[[Any], torch.Tensor | None]  # a batch's (B, T) real-token mask, or None


@dataclass
class GPTQReport:
    """Which layers GPTQ quantized and which kept round-to-nearest (with the reason)."""

    quantized: list[str] = field(default_factory=list)
    kept_rtn: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        why = sorted(set(self.kept_rtn.values()))
        rest = f"; {len(self.kept_rtn)} kept round-to-nearest ({', '.join(why)})" if why else ""
        return f"GPTQ: {len(self.quantized)} layers{rest}"


def _refusal(mod: nn.Module, shared: set[int]) -> str | None:
    """Why GPTQ leaves this quantized layer to round-to-nearest, or None."""
    if type(mod) not in (QATLinear, QATConv2d, QATConvBn2d):
        return f"{type(mod).__name__} layers"
    if isinstance(mod, QATConv2d) and mod.groups != 1:
        return "grouped convolutions"
    if id(mod.weight) in shared:
        return "shared weights"
    return None


def _targets(model: nn.Module, report: GPTQReport) -> dict[str, QATMixin]:
    seen: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    shared = {k for k, n in seen.items() if n > 1}
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QATMixin) or mod.weight_quant is None:
            continue
        why = _refusal(mod, shared)
        if why is None:
            out[name] = mod
        else:
            report.kept_rtn[name] = why
    return out


def layer_rows(mod: QATMixin, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its weight's columns, `(N, in * kh * kw)`, after the
    layer's own input quantizer."""
    x = mod._qin(x).detach().float()
    if isinstance(mod, QATConv2d):
        if mod.padding_mode != "zeros":
            x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
            pad = 0
        else:
            pad = mod.padding
        cols = F.unfold(x, mod.kernel_size, mod.dilation, pad, mod.stride)  # (B, C*k*k, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class _Stop(Exception):
    """Raised by a hook once the stage's layers have their input: the rest is not needed."""


def _real_rows(mod: QATMixin, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`layer_rows`, less the padded positions when `x` is laid out (B, T, features) like
    `mask`: a padded token's input never reaches the output, so it must not weigh on the
    Hessian."""
    rows = layer_rows(mod, x)  # quantized as the layer sees the batch, padding included
    if mod.FEATURES_LAST and token_major(x, mask):
        return rows[mask.reshape(-1).to(torch.bool)]
    return rows


def _measure(run: Callable[[Any], Any], items: list, layers: dict[str, QATMixin], stop: bool,
             masks: list[torch.Tensor | None]):
    """Hessians of `layers` over `run(item)` for each item (cut short when `stop`); `masks[i]`
    marks item i's real tokens (None: every row counts)."""
    hs = {n: Hessian(m.weight[0].numel()) for n, m in layers.items()}
    pending: set[str] = set()
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name):
        def fn(mod, args):
            hs[name].add(_real_rows(mod, args[0], current["mask"]))
            pending.discard(name)
            if stop and not pending:
                raise _Stop

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for item, mask in zip(items, masks, strict=True):
            current["mask"] = mask
            pending.update(layers)
            try:
                run(item)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    for h in hs.values():  # every rank walks the same stages: the reductions line up
        h.reduce()
    return hs


def _call_stages(model, batch, forward, layers: dict[str, QATMixin]) -> list[list[str]]:
    """The layers in the order one batch calls them, grouped by shared input tensor (held,
    not compared by `id`: a freed tensor's id is reused)."""
    stages: list[list[str]] = []
    seen: set[str] = set()
    last: list[torch.Tensor | None] = [None]

    def hook(name):
        def fn(mod, args):
            if name in seen:
                return
            seen.add(name)
            if stages and args[0] is last[0]:
                stages[-1].append(name)
            else:
                stages.append([name])
            last[0] = args[0]

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stages


def _fold(mod: QATMixin) -> torch.Tensor | None:
    """The per-output-channel factor BN folding multiplies the weight by (running statistics,
    as in eval and export), shaped to broadcast over the weight; None for other layers."""
    if not isinstance(mod, QATConvBn2d):
        return None
    return mod.fold_scale().detach()


@torch.no_grad()
def _apply(mod: QATMixin, h: Hessian, config: GPTQConfig) -> None:
    """GPTQ the weight the layer quantizes (for a BN-folded conv, `w * gamma / std`) and
    set the latent weight so that the layer computes GPTQ's codes."""
    wq, w, fold = mod.weight_quant, mod.weight, _fold(mod)
    x = w.detach().float() if fold is None else mod.folded_weight().detach().float()
    q, s, z = gptq_quantize(x.reshape(x.shape[0], -1), h.matrix(), wq.spec, config)
    wq.set_qparams(s, z)
    s, z = (t.detach() for t in wq.qparams())
    q = q.reshape(x.shape)
    on_code = grid.dequantize(q, s, z, wq.spec)
    # A weight GPTQ left on round-to-nearest's code keeps its value, one it moved sits on its
    # new code: the model computes GPTQ's codes either way, and QAT from GPTQ keeps where
    # each unmoved weight lay inside its step instead of starting every one at a code.
    kept = grid.quantize(x, s, z, wq.spec) == q
    if fold is not None:  # the latent weight is the folded one over the fold (gamma may be 0)
        kept |= fold == 0
        on_code = on_code / torch.where(fold == 0, 1.0, fold)
    # A kept weight folds to exactly `x` again; a moved one lies mid-step, where an ulp of
    # the division cannot change its code.
    w.copy_(torch.where(kept, w.detach().float(), on_code).to(w.dtype))


def _sequential(model, batches, forward, layers, config, report, progress, masks) -> None:
    """Stage by stage, each measured with every earlier stage already quantized. Stages
    inside a chain of repeated blocks run that block alone on its cached inputs (the
    block's output after its last stage is the next block's input); the rest, or every
    stage of a model that is not such a chain, run whole-model passes."""
    stages = _call_stages(model, batches[0], forward, layers)
    total, done = len(stages), [0]

    def quantize(run, items, stage):
        part = {n: layers[n] for n in stage}
        for name, h in _measure(run, items, part, True, masks).items():
            _apply(part[name], h, config)
            report.quantized.append(name)
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    whole = lambda b: forward(model, b)  # noqa: E731
    plan = block_plan(model, stages, lambda: whole(batches[0]))
    calls = None
    if plan is not None:
        for stage in plan.before:
            quantize(whole, batches, stage)
        calls = first_inputs(plan.blocks[0], [lambda b=b: whole(b) for b in batches])
    if plan is None or calls is None:
        for stage in stages[done[0] :]:
            quantize(whole, batches, stage)
        return
    for block, inside in zip(plan.blocks, plan.inside, strict=True):
        run = lambda call, block=block: block(*call[0], **call[1])  # noqa: E731
        for stage in inside:
            quantize(run, calls, stage)
        calls = [((hidden(run(c)),) + c[0][1:], c[1]) for c in calls]
    for stage in plan.after:
        quantize(whole, batches, stage)


@torch.no_grad()
def apply_gptq(
    model: nn.Module,
    batches: Iterable[Any],
    config: GPTQConfig | None = None,
    forward: Forward | None = None,
    progress: Callable[[int, int], None] | None = None,
    token_mask: TokenMask | None = None,
) -> GPTQReport:
    """GPTQ every Linear/Conv2d weight of the prepared, calibrated `model` on `batches` (a
    list: it is run several times when sequential). Returns which layers it quantized;
    `progress(done, total)` is called after each stage. `token_mask(batch)`, for padded
    batches, gives the (B, T) mask of real tokens: padded rows stay out of the Hessians.

    Example:
        >>> import qat
        >>> m = qat.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
        ...                 {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 4}}]})
        >>> xs = [torch.randn(16, 8) for _ in range(2)]
        >>> _ = qat.quant.calibrate(m, xs, num_batches=2)
        >>> apply_gptq(m, xs).summary()
        'GPTQ: 2 layers'
    """
    config = config or GPTQConfig()
    forward = forward or (lambda m, b: m(b))
    batches = list(batches)
    masks = [token_mask(b) if token_mask else None for b in batches]
    report = GPTQReport()
    layers = _targets(model, report)
    was_training = model.training
    model.eval()
    try:
        if not config.sequential:
            model.apply(disable_fake_quant)
            hs = _measure(lambda b: forward(model, b), batches, layers, False, masks)
            for name, mod in layers.items():
                if hs[name].n:
                    _apply(mod, hs.pop(name), config)
                    report.quantized.append(name)
        elif batches:
            _sequential(model, batches, forward, layers, config, report, progress, masks)
    finally:
        model.apply(enable_fake_quant)
        model.train(was_training)
    for name in layers:
        if name not in report.quantized:
            report.kept_rtn[name] = "layers the calibration batches never call"
    return report
