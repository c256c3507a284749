"""Real tokens of a padded batch: what activation observers (and GPTQ's Hessians) may see.

A sentence batch is padded to its longest sentence; the padded positions still run through
every layer, but their outputs are masked away before the loss. Their activations are not the
data's: left in, they stretch an observer's range (on MiniLM's sentences, 60% of positions are
padding and widen some int8 input ranges by half) and so coarsen every real token's grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from qat.quant.fake_quant import FakeQuantizer
from qat.quant.modules import QATMixin


def token_major(x: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `x` is laid out `(B, T, features)` like the `(B, T)` `mask` (the caller knows
    its features come last: a convolution's `(B, C, L)` can match by shape alone)."""
    return mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The `(N, features)` rows of a `(B, T, features)` `x` at the real tokens of `mask`;
    `x` itself when it is not laid out like the mask.

    Example:
        >>> x = torch.arange(12.0).reshape(2, 3, 2)
        >>> real_tokens(x, torch.tensor([[1, 1, 0], [1, 0, 0]])).tolist()
        [[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]
    """
    return x[mask.to(torch.bool)] if token_major(x, mask) else x


def _fed(model: nn.Module) -> list[FakeQuantizer]:
    """The activation quantizers of features-last layers whose observers are on."""
    out = []
    for m in model.modules():
        if isinstance(m, QATMixin) and m.FEATURES_LAST:
            qs = (m.input_quant, m.output_quant)
            out += [q for q in qs if q is not None and not q.spec.dynamic
                    and bool(q.observer_enabled)]  # fmt: skip
    return out


@contextlib.contextmanager
def observe_real_tokens(model: nn.Module, mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the activation observers of features-last layers (linear layers,
    embeddings; not convolutions or attention maps) that would update see only
    `real_tokens` of their input; everything a forward computes is unchanged. `mask=None`:
    no-op.

    Each such observer is switched off for the block and fed by a pre-forward hook instead,
    which updates it from the real tokens just before the quantizer runs, so the quantizer
    uses the scale those give (what its own observation would have done, less the padding).
    Keep the block open through backward where activation checkpointing re-runs the forward.

    Example:
        >>> import qat
        >>> rule = {"match": {"types": ["Linear"]}, "input": {"bits": 8, "observer": "minmax"}}
        >>> m = qat.prepare(nn.Sequential(nn.Linear(2, 2)), {"rules": [rule]}).train()
        >>> x = torch.tensor([[[1.0, -1.0], [50.0, 50.0]]])  # the second token is padding
        >>> with observe_real_tokens(m, torch.tensor([[1, 0]])):
        ...     _ = m(x)
        >>> m[0].input_quant.observer.max_val.item()
        1.0
    """
    if mask is None:
        yield
        return
    fed = _fed(model)

    @torch.no_grad()
    def observe(q: FakeQuantizer, args: tuple) -> None:
        x = real_tokens(args[0].detach(), mask)
        if q.takes_observations() and x.numel():  # a batch of padding alone: nothing to see
            q.observe(x)

    hooks = [q.register_forward_pre_hook(observe) for q in fed]
    for q in fed:
        q.observer_enabled.fill_(False)
    try:
        yield
    finally:
        for q in fed:
            q.observer_enabled.fill_(True)
        for h in hooks:
            h.remove()
