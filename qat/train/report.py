"""Run summaries: an atomic JSON write and the short table printed at the end of training."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def metric_name(task: str) -> str:
    return {"classification": "acc", "causal_lm": "ppl", "embedding": "cosine"}[task]


def print_summary(results: dict[str, Any], task: str) -> None:
    from rich.console import Console
    from rich.table import Table

    m = metric_name(task)
    table = Table(title=f"qat run ({results.get('recipe') or 'recipe'})")
    table.add_column("model")
    table.add_column(f"val {m}", justify="right")
    table.add_column(f"test {m}", justify="right")
    for stage in ("float", "qat", "export"):
        r = results.get(stage) or {}
        if r:
            table.add_row(
                stage,
                f"{r.get(f'val/{m}', float('nan')):.4f}",
                f"{r.get(f'test/{m}', float('nan')):.4f}",
            )
    console = Console()
    console.print(table)
    console.print(f"outputs: {results['run_dir']}")
