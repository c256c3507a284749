"""The parity gate for the ONNX target: ONNX Runtime against the integer executor.

    report = onnx_parity_report(int_model, "model.onnx", batches)   # per-layer, like parity_report
    report.check()                                                  # ParityError if exceeded
    onnx_parity(int_model, "model.onnx", batches)                   # the same, as a dict

Both compute the same integer codes from the same fp32 input, but the fp32 values between
quantizers differ in the last bits (ONNX Runtime's integer kernels apply `s_x * s_w` in fp32, a
conv feeding a quantizer directly becomes QLinearConv and requantizes in fixed point, and its
LayerNorm, Softmax and pooling kernels sum in another order). A value within that distance of a
rounding boundary is then quantized to neighbouring codes, exactly the ties `parity.measure`
describes. So the gate works the same way:

- *free running*: the exported model, as deployed, against the integer executor;
- *aligned*: a copy of the model that also outputs every layer's quantizer inputs and outputs
  (the tap tensors recorded at export) runs once; the executor then quantizes ONNX Runtime's
  value wherever its own is within `tie_tolerance` steps of it, and every layer's output is
  compared. Exposing those tensors stops a few fusions (e.g. Conv -> Relu -> Q into
  QLinearConv), so the aligned run checks the unfused kernels layer by layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qat.export.integer.layer import IntLayer
from qat.export.onnx import cpu
from qat.export.onnx import graph as onnx_graph
from qat.export.onnx.export import TARGET_KEY, ort_session, require_onnx
from qat.export.parity import (
    Aligner,
    ParityError,
    ParityReport,
    Recorder,
    TensorParity,
    aligned,
    as_tensor,
    compare_layers,
)


@dataclass
class OnnxParityReport(ParityReport):
    """`ParityReport` plus the share of bit-identical free-running outputs.

    Example:
        >>> out = TensorParity("output", max_abs=1e-7, max_ref=1.0, top1=1.0, calls=1)
        >>> OnnxParityReport(out, exact_share=0.75).to_dict()["exact_share"]
        0.75
    """

    exact_share: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "exact_share": self.exact_share}


def _feeds(session: Any, names: list[str], batch: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    wanted = {i.name for i in session.get_inputs()}  # the exporter drops unused inputs
    return {n: x.detach().cpu().numpy() for n, x in zip(names, batch, strict=False) if n in wanted}


def _taps_by_layer(taps: dict[str, str], values: dict[str, np.ndarray]) -> dict:
    """`{(layer, role): [tensor per call]}` from ONNX Runtime's tap outputs."""
    out: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = {}
    for key, name in taps.items():
        layer, role, call = key.split("|")
        out.setdefault((layer, role), []).append((int(call), torch.from_numpy(values[name])))
    return {k: [t for _, t in sorted(v, key=lambda c: c[0])] for k, v in out.items()}


@torch.no_grad()
def onnx_parity_report(
    int_model: nn.Module,
    path: str | Path,
    batches: Iterable[tuple[torch.Tensor, ...]],
    tie_tolerance: float = 0.01,
    threads: int | None = None,
) -> OnnxParityReport:
    """Run each batch (the model's positional inputs) through ONNX Runtime and `int_model`.

    Returns a `ParityReport` (`OnnxParityReport`): `free_running` is the deployed model against
    the executor, `output` and `layers` the aligned run (see the module docstring), `check()`
    the gate, `exact_share` the share of bit-identical free-running outputs.
    """
    onnx, _ = require_onnx()
    model = onnx.load(str(path))
    taps = onnx_graph.metadata(model, onnx_graph.TAPS_KEY) or {}
    names = onnx_graph.metadata(model, onnx_graph.INPUTS_KEY) or []
    deployed = ort_session(model, threads)
    tapped = ort_session(onnx_graph.with_outputs(model, list(taps.values())), threads)
    out_name = deployed.get_outputs()[0].name
    # Layers whose result the model's output never uses (an unused pooler) are not exported.
    exported = {key.split("|")[0] for key in taps}
    layer_names = [
        n for n, m in int_model.named_modules() if isinstance(m, IntLayer) and n in exported
    ]
    layers = {n: TensorParity(n) for n in layer_names}
    free = TensorParity("output (free running)")
    report = OnnxParityReport(
        TensorParity("output"), list(layers.values()), free, tie_tolerance=tie_tolerance
    )
    equal = total = 0
    was_training = int_model.training
    int_model.eval()
    try:
        for batch in batches:
            batch = tuple(batch)
            ref = as_tensor(int_model(*batch))
            got = torch.from_numpy(deployed.run([out_name], _feeds(deployed, names, batch))[0])
            report.free_running.add(ref, got, rows=True)  # raises if the shapes differ
            equal, total = equal + int((got == ref).sum()), total + ref.numel()
            wanted = [out_name, *taps.values()]
            values = dict(zip(wanted, tapped.run(wanted, _feeds(tapped, names, batch)),
                              strict=True))  # fmt: skip
            by_layer = _taps_by_layer(taps, values)
            _aligned_batch(int_model, layer_names, by_layer, values[out_name], batch, report)
            report.batches += 1
    finally:
        int_model.train(was_training)
    report.exact_share = equal / total if total else 1.0
    return report


def _aligned_batch(
    int_model: nn.Module,
    layer_names: list[str],
    by_layer: dict,
    onnx_out: np.ndarray,
    batch: tuple[torch.Tensor, ...],
    report: ParityReport,
) -> None:
    """The executor with ONNX Runtime's ties; per-layer and output errors into `report`."""
    mods = {id(int_model.get_submodule(n)): n for n in layer_names}
    quant_in = {k: v for k, v in by_layer.items() if k[1] in ("input", "output")}
    aligner = Aligner(quant_in, mods, report.tie_tolerance) if report.tie_tolerance > 0 else None
    with aligned(int_model, layer_names, aligner), Recorder(int_model, layer_names) as rec:
        out = as_tensor(int_model(*batch))
    report.output.add(out, torch.from_numpy(onnx_out), rows=True)
    onnx_outs = {n: by_layer.get((n, "out"), []) for n in layer_names}
    compare_layers(report, rec.outs, onnx_outs, ("the integer model", "ONNX Runtime"), aligner)


def onnx_parity(
    int_model: nn.Module,
    path: str | Path,
    batches: list[tuple[torch.Tensor, ...]],
    tie_tolerance: float = 0.01,
    threads: int | None = None,
) -> dict[str, Any]:
    """ONNX Runtime (CPU) against the integer executor on `batches`, as a JSON-ready dict.

    Top level, the model as deployed (free running): `max_abs`, `rel` (= max|a-b| / max|a|,
    a = the executor), `exact_share` (share of bit-identical outputs), `top1` (argmax
    agreement over the last dim, for logits), `min_cosine`; `aligned` the same for the aligned
    run, `failures` what `ParityReport.check()` (default tolerances) objects to, and `report`
    the full per-layer report. See `onnx_parity_report` for the gate itself.

    Example:
        >>> import qat, tempfile
        >>> from qat.export.onnx import export_onnx
        >>> m = qat.prepare(nn.Sequential(nn.Linear(8, 4)), {"rules": [
        ...     {"match": {"types": ["Linear"]}, "weight": {"bits": 8}, "input": {"bits": 8}}]})
        >>> _ = m(torch.randn(16, 8))
        >>> int_model = qat.convert(m)
        >>> path = export_onnx(int_model, (torch.randn(2, 8),), tempfile.mkdtemp() + "/m.onnx")
        >>> result = onnx_parity(int_model, path, [(torch.randn(5, 8),)])
        >>> result["top1"], result["failures"]
        (1.0, [])
    """
    return summary(onnx_parity_report(int_model, path, batches, tie_tolerance, threads))


def summary(report: OnnxParityReport) -> dict[str, Any]:
    """`onnx_parity`'s JSON-ready dict of a report."""
    free, aligned = report.free_running, report.output

    def errors(t: TensorParity) -> dict[str, Any]:
        return {"max_abs": t.max_abs, "rel": t.rel, "top1": t.top1, "min_cosine": t.min_cosine}

    return {
        **errors(free),
        "exact_share": report.exact_share,
        "aligned": {**errors(aligned), "ties": report.aligned},
        "failures": report.failures(),
        "report": report.to_dict(),
    }


def gate_onnx(
    int_model: nn.Module,
    path: str | Path,
    batches: list[tuple[torch.Tensor, ...]],
    max_rel_error: float = 1e-4,
    min_top1_agreement: float | None = 1.0,
    min_cosine: float | None = None,
) -> dict[str, Any]:
    """The export gate for an ONNX file: ONNX Runtime on this CPU must compute what the
    integer executor computes. On failure the file is removed and `ParityError` names the
    layer and the fix; on success returns `onnx_parity`'s dict plus `target`, this CPU's
    `family` and `exact_on` (the kernel families that are exact for the file's target).
    """
    onnx, _ = require_onnx()
    target = onnx_graph.metadata(onnx.load(str(path)), TARGET_KEY) or "any"
    family = cpu.cpu_family()
    report = onnx_parity_report(int_model, path, batches)
    failures = report.failures(max_rel_error, min_top1_agreement, min_cosine)
    if failures:
        Path(path).unlink(missing_ok=True)
        cause = cpu.inexact_layers(int_model, target, family)
        why = (f"export.onnx.target={target} stores int8 weights, and ONNX Runtime on this CPU "
               f"({cpu.describe(family)}) does not compute {cause[0]} exactly; export with "
               "export.onnx.target=any (exact on every CPU), or train 7-bit weights "
               "(recipe=w7a8) for target avx2" if cause else "; ".join(failures[:3]))
        raise ParityError(f"ONNX parity gate failed for {path}: {why}")
    exact_on = [f for f in cpu.FAMILIES if not cpu.inexact_layers(int_model, target, f)]
    return {**summary(report), "target": target, "family": family, "exact_on": exact_on}
