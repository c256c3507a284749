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


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The `(N, features)` rows of `x` at real tokens when `x` is laid out `(B, T, features)`
    like the `(B, T)` `mask`; otherwise `x` itself (images, attention maps, unpadded text).

    Example:
        >>> x = torch.arange(12.0).reshape(2, 3, 2)
        >>> real_tokens(x, torch.tensor([[1, 1, 0], [1, 0, 0]])).tolist()
        [[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]
    """
    if mask is None or x.dim() != 3 or x.shape[:2] != mask.shape:
        return x
    return x[mask.to(torch.bool)]


@contextlib.contextmanager
def observe_real_tokens(model: nn.Module, mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, activation observers that would update see only `real_tokens` of
    their input; weights and everything a forward computes are unchanged. `mask=None`: no-op.

    Each such observer is switched off for the block and fed by a pre-forward hook instead,
    which updates it from the real tokens just before the quantizer runs, so the quantizer
    uses the scale those give (what its own observation would have done, less the padding).

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
    fed = [q for q in model.modules() if isinstance(q, FakeQuantizer) and q.role != "weight"
           and not q.spec.dynamic and bool(q.observer_enabled)]  # fmt: skip

    def observe(q: FakeQuantizer, args: tuple) -> None:
        if q.takes_observations():
            q.observe(real_tokens(args[0], mask))

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
