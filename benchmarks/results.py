"""Accuracy of float vs PTQ vs QAT, measured on the exported integer model (parity-gated).

Protocol, per seed: train the float model; from that checkpoint run PTQ (calibrate, no weight
updates, export) and QAT (the recipe's schedule for N steps, export) for each recipe, and
continue the float model for the same N steps (the fair baseline). With `--gptq`, also GPTQ
PTQ (`task=ptq ptq=gptq`) and QAT started from GPTQ's codes (`recipe.init=gptq`) per recipe.
Mean and std over seeds.

    .venv/bin/python benchmarks/results.py --task digits --seeds 0 1 2
    .venv/bin/python benchmarks/results.py --task shakespeare --seeds 0 1 2
    .venv/bin/python benchmarks/results.py --task minilm --seeds 0 1 2
    .venv/bin/python benchmarks/results.py --task shakespeare --recipes w4g32 --gptq \
        --out benchmarks/results/gptq
    .venv/bin/python benchmarks/results.py --task shakespeare --recipes w4g32 --gptq \
        --mixed 3 4 8 --out benchmarks/results/pareto   # every method on one chart
    .venv/bin/python benchmarks/results.py --task shakespeare --recipes w2g32 --mixed 2 3 4 8 \
        --group-sizes 32 64 --measure kl --out /tmp/w2   # mixed widths and group sizes
    .venv/bin/python benchmarks/results.py --task shakespeare --from /tmp/w2/shakespeare.csv \
        /tmp/w3/shakespeare.csv --out benchmarks/results/groups   # merge runs made side by side

Writes benchmarks/results/<task>.csv (one row per run), <task>.md (the table) and
<task>_vs_size.png (the metric against artifact size, every method).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "experiment": "digits_w4a4",
        "recipes": ["w8a8", "w4a4_lsq", "w2a2_lsq"],
        "metric": "acc",
        "overrides": [],
    },
    "shakespeare": {
        "experiment": "shakespeare_w4g32a8",
        "recipes": ["w8a8", "w4g32_a8dyn", "w4g32"],
        "metric": "ppl",
        # Smaller than the experiment file (GPT small, 1000 float + 300 QAT steps, batch 32)
        # so that 3 seeds x 8 runs fit in about half an hour on 2 shared cores.
        "overrides": ["model.args.preset=tiny", "float_stage.max_steps=800",
                      "float_stage.lr=3e-3", "trainer.max_steps=200", "data.batch_size=16",
                      "trainer.val_check_interval=100"],
    },
    "minilm": {
        "experiment": "minilm_w8a8_kd",
        "recipes": ["w8a8", "w4a8"],
        "metric": "cosine",
        "overrides": [],
        # The teacher is the float model itself: continuing it changes nothing (cosine 1).
        "float_cont": False,
    },
}
QUIET = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar", "logger=none"]


def compose(overrides: list[str], out: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict


    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(ROOT / "data_cache")
        cfg.paths.log_dir = str(out.parent)
        cfg.paths.output_dir = str(out)
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def one_run(overrides: list[str], out: Path) -> dict[str, Any]:
    from qat.train.run import run

    if out.exists():  # a stale checkpoint from an earlier run must never be picked up
        shutil.rmtree(out)
    t0 = time.perf_counter()
    res = run(compose(overrides, out))
    res["seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="*", help="subset of the task's recipes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--runs-dir", type=Path,
                    help="where the runs go (default outputs/benchmarks/<name of --out>: runs "
                         "made side by side with different --out never share a float model)")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of other seeds already in <task>.csv")
    ap.add_argument("--gptq", action="store_true",
                    help="add GPTQ PTQ and GPTQ-initialised QAT rows for every recipe")
    ap.add_argument("--mixed", type=int, nargs="+", metavar="BITS",
                    help="add PTQ and QAT rows for the recipe task=sensitivity writes from "
                         "these candidate widths at the size of the recipe's own widths")
    ap.add_argument("--group-sizes", type=int, nargs="+", metavar="N",
                    help="with --mixed, also scan these group sizes of per-group weights "
                         "(sensitivity.group_sizes)")
    ap.add_argument("--scan-activations", choices=["float", "recipe"], default="float",
                    help="the scan's activations (sensitivity.activations)")
    ap.add_argument("--measure", choices=["loss", "kl", "sqnr"], default="loss",
                    help="what the sensitivity scan measures (sensitivity.measure)")
    ap.add_argument("--from", dest="merge", type=Path, nargs="+", metavar="CSV",
                    help="run nothing: write the table and plot of these CSVs' rows (from runs "
                         "made side by side), a seed's float rows once")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    spec = TASKS[args.task]
    m = spec["metric"]
    base = [f"experiment={spec['experiment']}", *QUIET, *spec["overrides"], *args.overrides]
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"{args.task}.csv"
    if args.append and csv_path.is_file():
        rows = [r for r in csv.DictReader(csv_path.open()) if int(r["seed"]) not in args.seeds]
    if args.merge:
        seen: dict[tuple[str, str, str], str] = {}
        for path in args.merge:
            for r in csv.DictReader(path.open()):
                key = (r["seed"], r["method"], r["recipe"])
                if key not in seen:
                    seen[key] = r["test"]
                    rows.append(r)
                elif seen[key] != r["test"]:  # e.g. a float model trained twice, differently
                    print(f"warning: {path}: {key} gives {r['test']}, kept {seen[key]}")
    for seed in [] if args.merge else args.seeds:
        runs = args.runs_dir or ROOT / "outputs" / "benchmarks" / args.out.resolve().name
        root = runs / args.task / f"seed{seed}"
        s = [f"seed={seed}"]
        fl = one_run(base + s + ["recipe=fp32", "trainer.max_steps=0"], root / "float")
        rows.append(_row(seed, "float", "-", fl["float"], fl, m))
        ckpt = root / "float" / "float" / "checkpoints" / "last.ckpt"
        init = [f"init_from={ckpt}"] if ckpt.is_file() else []  # pretrained models: no float run
        if spec.get("float_cont", True):
            cont = one_run(base + s + init + ["recipe=fp32"], root / "float_cont")
            rows.append(_row(seed, "float (continued)", "-", cont["qat"], cont, m))
        for recipe in args.recipes or spec["recipes"]:
            ptq = one_run(base + s + init + [f"recipe={recipe}", "trainer.max_steps=0"],
                          root / f"ptq_{recipe}")
            rows.append(_row(seed, "PTQ", recipe, ptq["export"], ptq, m))
            q = one_run(base + s + init + [f"recipe={recipe}"], root / f"qat_{recipe}")
            rows.append(_row(seed, "QAT", recipe, q["export"], q, m))
            if args.gptq:
                g = one_run(base + s + init + [f"recipe={recipe}", "task=ptq", "ptq=gptq"],
                            root / f"gptq_{recipe}")
                rows.append(_row(seed, "GPTQ", recipe, g["export"], g, m))
                gq = one_run(base + s + init + [f"recipe={recipe}", "recipe.init=gptq"],
                             root / f"qat_gptq_{recipe}")
                rows.append(_row(seed, "QAT from GPTQ", recipe, gq["export"], gq, m))
            if args.mixed:
                rows += _mixed_rows(base + s + init, recipe, args, root, seed, m)
            _write_csv(csv_path, rows)
            done = [r for r in rows if r["seed"] == seed and r["recipe"] == recipe]
            print(f"[{args.task}] seed {seed} {recipe}: "
                  + " ".join(f"{r['method']} {r['test']:.4f}" for r in done), flush=True)
    _write_csv(csv_path, rows)
    (args.out / f"{args.task}.md").write_text(table(rows, m, args.task))
    print(table(rows, m, args.task))
    from report import plot_methods

    plot_methods(rows, args.task, args.out / f"{args.task}_vs_size.png")


def _mixed_rows(base, recipe, args, root, seed, m) -> list[dict[str, Any]]:
    """Scan at `args.mixed` widths (and `args.group_sizes`) by `args.measure`, budget = the
    size the recipe gives the scanned weights (its first and last layers at 8 bits, say), then
    PTQ and QAT with the mixed recipe the scan wrote."""
    widths, sizes, measure = args.mixed, args.group_sizes, args.measure
    scan = ["task=sensitivity", f"sensitivity.bits=[{','.join(map(str, widths))}]",
            "sensitivity.budget_recipe=true", f"sensitivity.measure={measure}",
            f"sensitivity.activations={args.scan_activations}"]
    label = f"{recipe} mixed {'/'.join(map(str, widths))}"
    if sizes:
        scan.append(f"sensitivity.group_sizes=[{','.join(map(str, sizes))}]")
        label += f" g{'/'.join(map(str, sizes))}"
    sens = one_run(base + [f"recipe={recipe}", *scan], root / f"sens_{recipe}")
    mixed = sens["files"]["recipe"]
    label += "" if measure == "loss" else f" ({measure})"
    label += ", recipe activations" if args.scan_activations == "recipe" else ""
    ptq = one_run(base + [f"recipe={mixed}", "trainer.max_steps=0"], root / f"ptq_mixed_{recipe}")
    q = one_run(base + [f"recipe={mixed}"], root / f"qat_mixed_{recipe}")
    # What the scan itself expects: the summed change of its choice and of the recipe's widths.
    pred = {"predicted_mixed": sens["predicted_change"],
            "predicted_recipe": (sens.get("recipe_widths") or {}).get("predicted_change", "")}
    return [{**_row(seed, "PTQ", label, ptq["export"], ptq, m), **pred},
            {**_row(seed, "QAT", label, q["export"], q, m), **pred}]


def _row(seed, method, recipe, metrics, res, m) -> dict[str, Any]:
    artifact = (res.get("artifacts") or {}).get("qat", "")
    # The test loss too: digits' accuracy saturates at 99-100% on 270 images, its NLL does not.
    row = {"seed": seed, "method": method, "recipe": recipe, "test": metrics[f"test/{m}"],
           "val": metrics[f"val/{m}"], "test_loss": metrics.get("test/loss", float("nan")),
           "seconds": round(res["seconds"], 1), "artifact": artifact}
    if m == "cosine":
        row["nn_agreement"] = retrieval_agreement(artifact) if artifact else 1.0
    return row


def retrieval_agreement(artifact: str, n: int = 500) -> float:
    """Top-1 nearest-neighbour agreement on held-out sentences: for each test sentence, is
    its nearest other sentence the same under the exported model as under the float model?"""
    import torch

    import qat
    from qat.data import SentencesDataModule
    from qat.models.registry import build_model

    dm = SentencesDataModule(data_dir=str(ROOT / "data_cache"), batch_size=64, seed=0)
    dm.setup()
    q_model, f_model = qat.load(artifact), build_model("minilm").eval()
    embs: dict[str, list[torch.Tensor]] = {"q": [], "f": []}
    with torch.no_grad():
        for batch in dm.test_dataloader():
            args = (batch["input_ids"], batch["attention_mask"])
            embs["q"].append(q_model(*args))
            embs["f"].append(f_model(*args))
    nn_idx = {}
    for k, parts in embs.items():
        e = torch.nn.functional.normalize(torch.cat(parts)[:n], dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        nn_idx[k] = sim.argmax(-1)
    return float((nn_idx["q"] == nn_idx["f"]).float().mean())


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # --append mixes old rows in
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)


def table(rows: list[dict[str, Any]], m: str, task: str) -> str:
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["recipe"]), []).append(float(r["test"]))
    scale = 100.0 if m == "acc" else 1.0
    unit = " (%)" if m == "acc" else ""

    def fmt(vals: list[float], places: int = 4 if m == "cosine" else 2, k: float = scale) -> str:
        vals = [v for v in vals if not math.isnan(v)]  # older CSVs lack a column
        if not vals:
            return "-"
        sd = statistics.stdev(vals) * k if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals) * k:.{places}f} ± {sd:.{places}f}"

    n = len({str(r["seed"]) for r in rows})
    head = f"| method | recipe | test {m}{unit}, mean ± std over {n} seed{'s' * (n != 1)} |"
    lines = [head, "|---|---|---|"]
    extra_col = {"cosine": ("nn_agreement", "NN top-1 agreement", fmt),
                 "acc": ("test_loss", "test NLL", lambda v: fmt(v, 3, 1.0))}
    col = extra_col.get(m)
    if col and all(math.isnan(_number(r.get(col[0]))) for r in rows):
        col = None  # a CSV from before the column
    if col:
        lines = [head + f" {col[1]} |", "|---|---|---|---|"]
    for (method, recipe), vals in groups.items():
        extra = ""
        if col:
            more = [_number(r.get(col[0])) for r in rows
                    if (r["method"], r["recipe"]) == (method, recipe)]
            extra = f" {col[2](more)} |"
        lines.append(f"| {method} | {recipe} | {fmt(vals)} |{extra}")
    if m == "ppl":
        fl = statistics.mean(groups[("float", "-")])
        cont = statistics.mean(groups.get(("float (continued)", "-"), groups[("float", "-")]))
        lines += ["", "| recipe | (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_float) | same, with the "
                  "float model continued for as many steps as QAT |", "|---|---|---|"]
        # PTQ is round-to-nearest; GPTQ rows are measured against the same gap.
        for (method, recipe), vals in groups.items():
            if method in ("QAT", "GPTQ", "QAT from GPTQ"):
                ptq, q = statistics.mean(groups[("PTQ", recipe)]), statistics.mean(vals)
                share = (ptq - q) / (ptq - fl) if ptq != fl else float("nan")
                fair = (ptq - q) / (ptq - cont) if ptq != cont else float("nan")
                name = recipe if method == "QAT" else f"{recipe}, {method}"
                lines.append(f"| {name} | {share:.0%} | {fair:.0%} |")
    return "\n".join(lines + _paired(rows, m) + _predictions(rows)) + "\n"


def _paired(rows: list[dict[str, Any]], m: str) -> list[str]:
    """Seed by seed, from the same float checkpoint: QAT from GPTQ against QAT, and each mixed
    recipe against the recipe whose size it was given (after PTQ and after QAT). The means
    above hide differences smaller than the spread between seeds; these pairs do not."""
    recipes = dict.fromkeys(r["recipe"] for r in rows if r["recipe"] != "-")
    pairs = []
    for rec in recipes:
        base = rec.split(" mixed ")[0]
        if rec != base:
            pairs += [(("PTQ", rec), ("PTQ", base)), (("QAT", rec), ("QAT", base))]
        elif any((r["method"], r["recipe"]) == ("QAT from GPTQ", rec) for r in rows):
            pairs.append((("QAT from GPTQ", rec), ("QAT", rec)))
    if not pairs:
        return []
    # (column, name, +1 where higher is better, scale); digits' accuracy moves in whole images,
    # its NLL does not.
    cols = [("test", m, -1.0 if m == "ppl" else 1.0, 100.0 if m == "acc" else 1.0)]
    if m == "acc":
        cols.append(("test_loss", "NLL", -1.0, 1.0))
    lines = ["", "| pair (same seed, same float checkpoint) | "
             + " | ".join(f"{name} difference per seed | better / equal / worse"
                          for _, name, _, _ in cols) + " |",
             "|---|" + "---|---|" * len(cols)]  # fmt: skip
    values = {key: {(r["method"], r["recipe"], str(r["seed"])): _number(r.get(key))
                    for r in rows} for key, _, _, _ in cols}  # fmt: skip
    for a, b in pairs:
        cells = []
        for key, _, sign, scale in cols:
            v = values[key]
            seeds = sorted({k[2] for k in v if k[:2] == a and (*b, k[2]) in v}, key=int)
            d = [(v[(*a, sd)] - v[(*b, sd)]) * scale for sd in seeds]
            tally = [sum(sign * x > 0 for x in d), sum(x == 0 for x in d),
                     sum(sign * x < 0 for x in d)]
            cells += [" ".join(f"{x:+.4f}" for x in d), " / ".join(map(str, tally))]
        lines.append(f"| {a[0]} {a[1]} - {b[0]} {b[1]} | " + " | ".join(cells) + " |")
    return lines


def _number(v: Any) -> float:
    """A CSV cell as a float; an empty or missing one (an older CSV's) as NaN."""
    return float("nan") if v is None or v == "" else float(v)


def _predictions(rows: list[dict[str, Any]]) -> list[str]:
    """The scan's own forecast for each mixed recipe: its summed change against that of the
    recipe's own widths at the same size (mean over seeds)."""
    pred: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        own = _number(r.get("predicted_recipe"))
        if r["method"] == "QAT" and not math.isnan(own):
            pred.setdefault(r["recipe"], []).append((own, _number(r["predicted_mixed"])))
    if not pred:
        return []
    lines = ["", "| mixed recipe | scan's predicted change: recipe's own widths | mixed | "
             "mixed / own |", "|---|---|---|---|"]
    for label, pairs in pred.items():
        own, mixed = (statistics.mean(p[i] for p in pairs) for i in (0, 1))
        ratio = f"{mixed / own:.2f}" if own > 0 else "-"
        lines.append(f"| {label} | {own:.4g} | {mixed:.4g} | {ratio} |")
    return lines


if __name__ == "__main__":
    main()
