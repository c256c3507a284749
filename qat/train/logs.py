"""The CSV metrics log, written atomically: a crash or a full disk never tears `metrics.csv`.

Lightning's CSVLogger appends rows and rewrites the file in place when a new metric appears,
so a kill in that rewrite loses the log, and a full disk ends in a bare `OSError`. Here every
save rewrites the whole file through `qat.io.atomic_write` (rows are few: one per logging step).
"""

from __future__ import annotations

import csv
import io
from typing import Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from qat.io import WriteError, atomic_write, writing


class AtomicExperimentWriter(ExperimentWriter):
    """Keeps every row; `save()` writes them all to a temp file and renames it."""

    def __init__(self, log_dir: str) -> None:
        with writing(log_dir, "log folder"):
            super().__init__(log_dir)
        self.rows: list[dict[str, Any]] = []

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        self.rows += self.metrics
        self.metrics = []
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self.rows)
        text = buf.getvalue().encode()
        atomic_write(self.metrics_file_path, lambda f: f.write(text), "metrics log")


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger with `AtomicExperimentWriter` (same folders and columns).

    Example:
        >>> import tempfile
        >>> log = CSVLogger(tempfile.mkdtemp(), name="logs")
        >>> log.log_metrics({"loss": 0.5}, step=1); log.save()
        >>> open(log.experiment.metrics_file_path).read().splitlines()
        ['loss,step', '0.5,1']
    """

    @property
    def experiment(self) -> AtomicExperimentWriter:
        if self._experiment is None:
            with writing(self.root_dir, "log folder"):
                self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    def finalize(self, status: str) -> None:
        try:
            super().finalize(status)
        except WriteError:
            if status != "failed":  # a failed run is already raising its own error
                raise
