"""Tables and plots from the results runs: artifact size per recipe, metric against size per
task, and per-layer quantization error (SQNR) of the digits CNN.

    .venv/bin/python benchmarks/report.py          # after benchmarks/results.py
    .venv/bin/python benchmarks/report.py --readme # also fill README.md's Results section

Reads benchmarks/results/<task>.csv and the artifacts' manifests; writes sizes.md,
<task>_vs_size.png and layer_sqnr.png into benchmarks/results/. `--readme` rewrites the part of
README.md between the `results:start` / `results:end` markers with results_section.md (the
prose, a template) filled from benchmarks/results/*.md (qat_overhead.md, onnx_speed_vnni*.md,
onnx_parity_vnni.md, llm_gguf*.md and deploy_accuracy.md are those scripts' output, saved with
`| tee`).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
LABEL = {"digits": "test accuracy", "shakespeare": "test perplexity", "minilm": "cosine to float"}


def rows(task: str) -> list[dict]:
    path = OUT / f"{task}.csv"
    return list(csv.DictReader(path.open())) if path.is_file() else []


def sizes(task: str) -> dict[str, tuple[int, int]]:
    """recipe -> (artifact bytes, float32 state_dict bytes), from the manifests."""
    return _sizes(rows(task))


def _sizes(rs: list[dict]) -> dict[str, tuple[int, int]]:
    out = {}
    for r in rs:
        if r["artifact"] and r["recipe"] not in out:
            s = json.loads((Path(r["artifact"]) / "manifest.json").read_text())["sizes"]
            out[r["recipe"]] = (s["artifact_bytes"], s["float32_state_dict_bytes"])
    return out


def size_table() -> str:
    lines = ["| task (model) | recipe | artifact (KiB) | float32 (KiB) | ratio |",
             "|---|---|---|---|---|"]
    names = {"digits": "digits (ResNet CNN)", "shakespeare": "shakespeare (GPT tiny)",
             "minilm": "MiniLM (BERT 22.7M)"}
    for task in ("digits", "shakespeare", "minilm"):
        for recipe, (a, f) in sizes(task).items():
            lines.append(f"| {names[task]} | {recipe} | {a / 1024:.0f} | {f / 1024:.0f} | "
                         f"{a / f:.3f} |")
    return "\n".join(lines) + "\n"


MARKERS = {"PTQ": "x", "GPTQ": "+", "QAT": "o", "QAT from GPTQ": "s"}


def plot_vs_size(task: str) -> None:
    if rows(task):
        plot_methods(rows(task), task, OUT / f"{task}_vs_size.png")


def plot_methods(rs: list[dict], task: str, path: Path) -> None:
    """Metric (mean over seeds) against artifact size for every method and recipe in `rs`,
    the rows of one results.py run, with the float model as a line and a point at its size."""
    sz = _sizes(rs)
    if not sz:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    floats = [float(r["test"]) for r in rs if r["method"] == "float"]
    f_bytes = next(iter(sz.values()))[1]
    ax.axhline(statistics.mean(floats), color="gray", ls="--", label="float32")
    for i, (method, marker) in enumerate(MARKERS.items()):
        for mixed in (False, True):  # the scan's recipes: hollow, and unlabelled (they sit
            xs, ys, labels = [], [], []  # by the uniform recipe whose size they were given)
            for recipe, (a, _) in sz.items():
                if (" mixed " in recipe) != mixed:
                    continue
                vals = [float(r["test"]) for r in rs
                        if r["method"] == method and r["recipe"] == recipe]  # fmt: skip
                if vals:
                    xs.append(a / 1024), ys.append(statistics.mean(vals)), labels.append(recipe)
            if not xs:
                continue
            color = f"C{i}"
            style = ({"facecolors": "none", "edgecolors": color} if mixed and marker not in "x+"
                     else {"color": color})  # fmt: skip
            ax.scatter(xs, ys, marker=marker, label=method + (", mixed" if mixed else ""),
                       alpha=0.6 if mixed and marker in "x+" else 1.0, **style)  # fmt: skip
            for x, y, lab in zip(xs, ys, labels, strict=True):
                if not mixed:
                    ax.annotate(lab, (x, y), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")  # fmt: skip
    ax.scatter([f_bytes / 1024], [statistics.mean(floats)], color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("artifact size (KiB, log)")
    ax.set_ylabel(LABEL[task])
    ax.set_title(f"{task}: exported integer models", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_sqnr() -> None:
    """Per-layer output SQNR (dB) of the digits CNN after PTQ calibration (20 training
    batches) with each recipe: fake quant on against the same float weights, fake quant off."""
    import numpy as np

    import qat
    from qat.data import DigitsDataModule
    from qat.models.registry import build_model
    from qat.train.checkpoint import load_checkpoint, model_state

    fckpt = ROOT / "outputs/benchmarks/digits/seed0/float/float/checkpoints/last.ckpt"
    if not fckpt.is_file():
        return
    dm = DigitsDataModule(data_dir=str(ROOT / "data_cache"))
    dm.setup()
    x = next(iter(dm.test_dataloader()))["x"]
    recipes = ["w8a8", "w4a4_lsq", "w2a2_lsq"]
    table: dict[str, list[float]] = {}
    names: list[str] = []
    for recipe in recipes:
        model = build_model("cnn")
        model.load_state_dict(model_state(load_checkpoint(fckpt)))
        qat.prepare(model, ROOT / "configs" / "recipe" / f"{recipe}.yaml")
        qat.quant.calibrate(model, (b["x"] for b in dm.train_dataloader()), 20)
        model.eval().apply(qat.quant.disable_observer)
        names = [n for n, m in model.named_modules() if hasattr(m, "weight_quant")]
        outs: dict[str, dict[str, torch.Tensor]] = {"q": {}, "f": {}}
        current = {"run": "q"}
        for n in names:
            model.get_submodule(n).register_forward_hook(
                lambda mod, inp, out, n=n, o=outs, c=current: o[c["run"]].__setitem__(
                    n, out.detach()
                )
            )
        with torch.no_grad():
            for run, switch in (("q", qat.quant.enable_fake_quant),
                                ("f", qat.quant.disable_fake_quant)):
                current["run"] = run
                model.apply(switch)
                model(x)
        table[recipe] = [
            10 * torch.log10(outs["f"][n].pow(2).mean()
                             / (outs["q"][n] - outs["f"][n]).pow(2).mean()).item()
            for n in names
        ]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    pos = np.arange(len(names))
    for i, recipe in enumerate(recipes):
        ax.bar(pos + (i - 1) * 0.27, table[recipe], width=0.27, label=recipe)
    ax.set_xticks(pos, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title("digits CNN after PTQ: per-layer output SQNR vs float (errors accumulate)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "layer_sqnr.png", dpi=120)
    plt.close(fig)


def _md(name: str) -> str:
    p = OUT / name
    return p.read_text().strip() if p.is_file() else "_not measured yet_"


def _seeds(task: str) -> str:
    n = len({r["seed"] for r in rows(task)})
    return f"{n} seed{'s' if n != 1 else ''}"


def readme_section() -> str:
    """The README's Results section: `results_section.md` with each `{{table NAME}}` replaced
    by benchmarks/results/NAME and each `{{seeds TASK}}` by that task's seed count."""
    text = (ROOT / "benchmarks" / "results_section.md").read_text()
    text = re.sub(r"\{\{table ([^}]+)\}\}", lambda m: _md(m.group(1)), text)
    return re.sub(r"\{\{seeds ([^}]+)\}\}", lambda m: _seeds(m.group(1)), text)


def fill_readme(path: Path = ROOT / "README.md") -> None:
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: the markers {start} and {end} are missing")
    a, b = text.index(start) + len(start), text.index(end)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text[:a] + "\n" + readme_section() + text[b:])
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--readme", action="store_true", help="fill README.md's Results section")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results import TASKS, table

    for task, spec in TASKS.items():  # the tables again from the CSVs (partial runs too)
        if rows(task):
            (OUT / f"{task}.md").write_text(table(rows(task), spec["metric"], task))
    (OUT / "sizes.md").write_text(size_table())
    print(size_table())
    for task in ("digits", "shakespeare", "minilm"):
        plot_vs_size(task)
    layer_sqnr()
    if args.readme:
        fill_readme()


if __name__ == "__main__":
    main()
