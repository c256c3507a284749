"""The parity gate's measurement: the integer model against the fake-quant model it came from.

The exact integer accumulation and the fake-quant model's fp32 matmul differ by fp32 rounding
(~1e-7 relative). Where an activation lies within that distance of a rounding boundary of the
next quantizer, the two models round it to neighbouring codes; the one-step difference then
propagates (measured: 1e-3 to 1e-2 relative logit error on a few percent of GPT batches, and
an occasional top-1 flip). Neither model is wrong there: fp32 cannot decide such a tie. So the
gate runs the integer model twice per batch. The *free-running* run is reported as it is. In
the *aligned* run, every activation quantizer of the integer model whose input differs from
the reference quantizer's input by at most `tie_tolerance` quantization steps (default 0.01,
some 300 times the fp32 noise measured in 8-bit GPT layers) quantizes the reference's value
instead, so ties are decided as the reference decided them; the number of codes that changed is
reported. Anything larger than a tie still propagates, and the gate bounds every layer's error
in the aligned run as well as the output's, so a layer that computes wrongly cannot hide.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from qat.export.integer.layer import IntLayer
from qat.export.parity.align import Aligner, aligned
from qat.export.parity.compare import LayerComparison, Recorder, live
from qat.export.parity.report import ParityReport, TensorParity
from qat.quant.control import frozen_eval
from qat.quant.fake_quant import FakeQuantizer

Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """`model(**batch)` for a mapping (labels dropped), `model(batch[0])` for a tuple/list."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k not in ("labels", "label")})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def as_tensor(out: Any) -> torch.Tensor:
    """The tensor a model returned: itself, `.logits`, `.last_hidden_state`, or the first item."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot compare a model output of type {type(out).__name__}")


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """No TF32 in the reference: the fake-quant model's arithmetic is fp32 (GPU matmul/conv)."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _quantizer_inputs(model: nn.Module, names: list[str], store: dict) -> list:
    """Pre-hooks recording what each layer's activation quantizers see, per call."""

    def make(key):
        def hook(_mod, args):
            store.setdefault(key, []).append(args[0].detach())

        return hook

    handles = []
    for name in names:
        for role in ("input", "output"):
            fq = getattr(model.get_submodule(name), f"{role}_quant", None)
            if isinstance(fq, FakeQuantizer):
                handles.append(fq.register_forward_pre_hook(make((name, role))))
    return handles


@torch.no_grad()
def parity_report(
    reference: nn.Module,
    int_model: nn.Module,
    inputs: Iterable[Any],
    forward: Forward | None = None,
    tie_tolerance: float = 0.01,
) -> ParityReport:
    """Run each batch of `inputs` through both models and measure how far they differ.

    `reference` is the fake-quant model `int_model` was converted from (same module names);
    `forward(model, batch)` returns the output to compare (a tensor, or an object with `.logits`
    or `.last_hidden_state`), by default `default_forward`. The reference runs in eval mode with
    observers off; both models are left as they were. `tie_tolerance=0` turns alignment off.

    Example:
        >>> import qat
        >>> m = qat.prepare(nn.Sequential(nn.Linear(8, 4)), {"rules": [
        ...     {"match": {"types": ["Linear"]}, "weight": {"bits": 4}, "input": {"bits": 8}}]})
        >>> _ = m(torch.randn(16, 8))
        >>> rep = parity_report(m, qat.convert(m), [torch.randn(4, 8)])
        >>> rep.check()
    """
    forward = forward or default_forward
    names = [n for n, m in int_model.named_modules() if isinstance(m, IntLayer)]
    missing = [n for n in names if not isinstance(_get(reference, n), nn.Module)]
    if missing:
        raise ValueError(
            f"reference model has no module {missing[0]!r}: pass the prepared (fake-quant) model "
            "that qat.convert() turned into this integer model"
        )
    int_layers = {id(int_model.get_submodule(n)): n for n in names}
    layers = {n: TensorParity(n) for n in names}
    free = TensorParity("output (free running)") if tie_tolerance > 0 else None
    report = ParityReport(
        TensorParity("output"), list(layers.values()), free, tie_tolerance=tie_tolerance
    )
    with frozen_eval(reference), frozen_eval(int_model), _full_fp32():
        for batch in inputs:
            quant_in: dict = {}
            hooks = _quantizer_inputs(reference, names, quant_in)
            try:
                with Recorder(reference, names) as ref_rec:
                    ref = as_tensor(forward(reference, batch))
            finally:
                for h in hooks:
                    h.remove()
            aligner = None
            if free is not None:
                free.add(ref, as_tensor(forward(int_model, batch)), rows=True)
                aligner = Aligner(quant_in, int_layers, tie_tolerance)
            comparison = LayerComparison(report, ref_rec.outs, aligner=aligner)
            with aligned(int_model, names, aligner), live(int_model, names, comparison):
                out = as_tensor(forward(int_model, batch))
            report.output.add(ref, out, rows=True)
            report.batches += 1
    return report


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
