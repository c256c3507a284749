"""`float_view`: a prepared model computing as the float model it was prepared from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from qat.quant.fake_quant import FakeQuantizer
from qat.quant.modules import QATMixin


@contextlib.contextmanager
def float_view(model: nn.Module) -> Iterator[nn.Module]:
    """For the block, `model` in eval mode with every quantizer off (no fake quant, no
    observing) and every LoRA update left out; all of it restored after.

    Under LoRA-QAT the base weights never train, so this is the float model itself: the
    distillation teacher without a copy of the weights (as peft's `disable_adapter`).

    Example:
        >>> import torch, qat
        >>> m = qat.prepare(nn.Sequential(nn.Linear(4, 2)),
        ...                 {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 2}}]})
        >>> x = torch.randn(3, 4)
        >>> _ = m(x)  # calibrates
        >>> with float_view(m):
        ...     torch.equal(m(x), x @ m[0].weight.T + m[0].bias)
        True
    """
    quantizers = [(q, q.fake_quant_enabled.clone(), q.observer_enabled.clone())
                  for q in model.modules() if isinstance(q, FakeQuantizer)]  # fmt: skip
    adapters = [(m, m.lora) for m in model.modules()
                if isinstance(m, QATMixin) and m.lora is not None]  # fmt: skip
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for q, _, _ in quantizers:
            q.fake_quant_enabled.fill_(False)
            q.observer_enabled.fill_(False)
        for m, _ in adapters:
            m.lora = None
        yield model
    finally:
        for q, fq, obs in quantizers:
            q.fake_quant_enabled.copy_(fq)
            q.observer_enabled.copy_(obs)
        for m, lora in adapters:
            m.lora = lora
        for m, training in modes:
            m.training = training
