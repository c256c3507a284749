"""`export_model`: convert, run the parity gate, and save: the one call a trainer makes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from qat.export.artifact import save
from qat.export.convert import convert
from qat.export.parity.measure import Forward, parity_report
from qat.export.parity.report import ParityReport


def export_model(
    model: nn.Module,
    batches: Iterable[Any],
    directory: str | os.PathLike | None = None,
    forward: Forward | None = None,
    max_rel_error: float = 1e-4,
    min_top1_agreement: float | None = 1.0,
    min_cosine: float | None = None,
    tie_tolerance: float = 0.01,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> tuple[nn.Module, ParityReport, Path | None]:
    """Convert `model`, gate it on `batches` (validation data), and save it to `directory`.

    Prints the parity report through `log`; raises `ParityError` (nothing saved) when a
    tolerance is exceeded. With `directory=None` nothing is written. Returns the integer model,
    the report and the artifact path. For embedding models pass `min_top1_agreement=None` and,
    say, `min_cosine=0.9999`.

    Example:
        >>> import qat, torch
        >>> m = qat.prepare(nn.Sequential(nn.Linear(8, 4)), {"rules": [
        ...     {"match": {"types": ["Linear"]}, "weight": {"bits": 8}, "input": {"bits": 8}}]})
        >>> _ = m(torch.randn(16, 8))
        >>> int_model, report, _ = export_model(m, [torch.randn(4, 8)], log=None)
        >>> report.output.rel < 1e-4
        True
    """
    int_model = convert(model)
    report = parity_report(model, int_model, batches, forward, tie_tolerance)
    if log is not None:
        log(str(report))
    report.check(max_rel_error, min_top1_agreement, min_cosine)
    path = None
    if directory is not None:
        path = save(int_model, directory, parity=report, extra=extra, overwrite=overwrite)
    return int_model, report, path
