"""What a run prints: each event once, a step progress bar, and one closing table.

Lightning's INFO lines (device availability, "fit stopped", advertisements for its cloud
products) are dropped; its warnings stay and go through the root logger once (Hydra's
console and file handlers). The run prints its own events instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from rich.console import Console
from rich.table import Table

from qat.train.objectives import METRIC

# Library warnings that say nothing to a user of this project.
_NOISE = (
    r".*does not have many workers.*",  # CPU runs load in-process by design
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # Metrics are deliberately not synced: every rank evaluates the whole split (ObjectiveMetrics).
    r".*when logging on epoch level in distributed setting.*",
    # A resumed run writes into a folder of its own by design (the old run stays whole).
    r"The dirpath has changed from.*",
    # prepare's warning about float modules: the plan summary printed before says it already.
    r"not quantizable, stays float:.*",
)


def quiet_libraries() -> None:
    """Library loggers at WARNING, through the root logger's handlers only; no download or
    weight-loading progress bars from Hugging Face libraries."""
    for name in ("lightning.pytorch", "lightning.fabric", "gguf"):
        log = logging.getLogger(name)
        log.setLevel(logging.WARNING)
        log.handlers.clear()
        log.propagate = True
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is imported
    if "transformers" in sys.modules:  # imported already: switch its bars off directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def say(message: str) -> None:
    """One event line on the console."""
    Console(highlight=False, soft_wrap=True).print(message)


class StepProgressBar(RichProgressBar):
    """Rich progress with the stage (`float`, `qat`) in place of `Epoch 0/-2` (runs are
    counted in optimizer steps over an endless stream) and without the logger's `v_num`.
    (Overrides Lightning's `_get_train_description`, the one place it names the epoch.)"""

    def __init__(self, stage: str = "train", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stage = stage

    def _get_train_description(self, current_epoch: int) -> str:
        return self._stage

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


@contextmanager
def step_bar(name: str, show: bool) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar for work counted in steps: yields `advance(done, total)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = (name, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not show) as bar:
        task = bar.add_task(name, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def calibration_batches(batches: Iterable[Any], total: int, show: bool) -> Iterator[Any]:
    """`batches` (the first `total`) with a progress bar, an estimate once the first batch
    is timed (when the whole will take a while), and a closing line."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    start, used = time.perf_counter(), 0
    columns = ("calibrate", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not show) as bar:
        task = bar.add_task("calibrate", total=total)
        for batch in islice(batches, total):  # no batch drawn beyond the last one used
            yield batch
            used += 1
            bar.advance(task)
            first = time.perf_counter() - start
            if used == 1 and show and first * total > 30:
                bar.console.print(f"calibration: {first:.1f} s per batch, about "
                                  f"{first * total / 60:.1f} min for {total} batches "
                                  "(see the plan's cost note)", highlight=False, soft_wrap=True)
    if show:
        say(f"calibrated on {used} batches in {time.perf_counter() - start:.1f} s")


def stage_line(stage: str, metrics: dict[str, float], objective: str, seconds: float) -> str:
    m = METRIC[objective]
    val, test = metrics.get(f"val/{m}", float("nan")), metrics.get(f"test/{m}", float("nan"))
    return f"{stage}: val {m} {val:.4f}, test {m} {test:.4f} ({seconds:.1f} s)"


OUTPUT_NAMES = {"qat": "artifact", "onnx": "ONNX", "gguf": "GGUF"}


def print_summary(results: dict[str, Any], objective: str, outputs: dict[str, str]) -> None:
    """The closing table: each model's metrics, then every file the run wrote."""
    m = METRIC[objective]
    table = Table(title=f"qat run ({results.get('recipe') or 'recipe'})")
    table.add_column("model")
    table.add_column(f"val {m}", justify="right")
    table.add_column(f"test {m}", justify="right")
    for stage in ("float", "qat", "ptq", "export", "integer", "fake_quant", "without_fake_quant"):
        r = results.get(stage) or {}
        if r:
            table.add_row(stage, f"{r.get(f'val/{m}', float('nan')):.4f}",
                          f"{r.get(f'test/{m}', float('nan')):.4f}")
    console = Console(soft_wrap=True, highlight=False)
    if table.row_count:
        console.print(table)
    console.print("outputs:")
    for what, path in outputs.items():
        console.print(f"  {OUTPUT_NAMES.get(what, what):<11} {_short(path)}")


def _short(path: str) -> str:
    """`path` relative to the working directory when it lies below it."""
    p = Path(path).absolute()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)
