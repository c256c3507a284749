"""The scan as files a person reads: a Markdown table, the same rows as CSV, and a plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from qat.io import atomic_path, atomic_write
from qat.sensitivity.scan import Group
from qat.sensitivity.width import Width


def _rows(groups: list[Group], chosen: dict[str, Width]) -> tuple[list[str], list[list[str]]]:
    widths = sorted(groups[0].bytes)
    head = ["group", "layers", "weights"]
    head += [f"d@{w}" for w in widths] + [f"sqnr@{w}" for w in widths] + ["chosen"]
    rows = []
    for g in groups:
        rows.append([g.name, str(len(g.layers)), str(g.weights)]
                    + [f"{g.delta[b]:.4g}" for b in widths]
                    + [f"{g.sqnr[b]:.1f}" for b in widths] + [str(chosen[g.name])])  # fmt: skip
    return head, rows


def write_tables(groups: list[Group], chosen: dict[str, Width], out_dir: Path) -> list[Path]:
    """`sensitivity.md` and `sensitivity.csv` in `out_dir`: per group its measured cost
    (`d@4`, `d@3g64`: bits, group size) and weight SQNR in dB at each width, and the width
    chosen."""
    head, rows = _rows(groups, chosen)
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([head, *rows])
    return [atomic_write(out_dir / "sensitivity.md", lambda f: f.write(md.encode()), "table"),
            atomic_write(out_dir / "sensitivity.csv", lambda f: f.write(buf.getvalue().encode()),
                         "table")]  # fmt: skip


def write_plot(groups: list[Group], chosen: dict[str, Width], path: Path, what: str) -> Path | None:
    """Per group the cost at each width (log scale), the chosen width marked; None when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    widths = sorted(groups[0].bytes)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(groups)), 4))
    x = range(len(groups))
    for w in widths:
        label = f"{w.bits} bits" + (f", groups of {w.group_size}" if w.group_size else "")
        ax.plot(x, [max(g.delta[w], 1e-6) for g in groups], marker="o", label=label)
    ax.scatter(x, [max(g.delta[chosen[g.name]], 1e-6) for g in groups], s=120,
               facecolors="none", edgecolors="black", label="chosen")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(list(x), [g.name for g in groups], rotation=90, fontsize=7)
    ax.set_ylabel(what)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, "plot") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
