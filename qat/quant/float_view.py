"""`float_view`: a prepared model computing as the float model it was prepared from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from qat.quant.control import disable_fake_quant, frozen_eval, quantizers
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
    quantizing = [(q, q.fake_quant_enabled.clone()) for q in quantizers(model).values()]
    adapters = [(m, m.lora) for m in model.modules()
                if isinstance(m, QATMixin) and m.lora is not None]  # fmt: skip
    with frozen_eval(model):
        try:
            model.apply(disable_fake_quant)
            for m, _ in adapters:
                m.lora = None
            yield model
        finally:
            for q, on in quantizing:
                q.fake_quant_enabled.copy_(on)
            for m, lora in adapters:
                m.lora = lora
