"""Hydra callback: after a multirun, one summary table (markdown + CSV) of all runs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qat.io import atomic_write


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job (`<experiment>/<job number>/metrics.json`), in job order."""
    found = sweep_dir.glob("*/*/metrics.json")
    rows = []
    for f in sorted(found, key=lambda p: (int(p.parent.name), str(p))):
        r = json.loads(f.read_text())
        run = f"{f.parent.parent.name}/{f.parent.name}"
        row: dict[str, Any] = {"run": run, "recipe": r.get("recipe")}
        for stage in ("float", "qat", "export"):
            for k, v in (r.get(stage) or {}).items():
                row[f"{stage} {k}"] = v
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = collect(sweep_dir)
    if not rows:
        return rows
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    csv_text = buf.getvalue().encode()
    atomic_write(sweep_dir / "summary.csv", lambda f: f.write(csv_text))

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v if v is not None else "")

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    md_text = ("\n".join(md) + "\n").encode()
    atomic_write(sweep_dir / "summary.md", lambda f: f.write(md_text))
    return rows


class SweepSummary(Callback):
    """Writes `summary.md` and `summary.csv` in the sweep dir when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        if rows:
            print(f"sweep summary of {len(rows)} runs: {sweep_dir / 'summary.md'} (and .csv)")
