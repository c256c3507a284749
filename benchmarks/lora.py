"""Full QAT vs LoRA-QAT: trainable parameters, peak RAM and step time per model, and the
final metric on the Shakespeare GPT.

Cost (`--models`): each (model, recipe) runs in its own process, so its peak RSS is its own:
the model is built, prepared and calibrated, the peak is reset (`/proc/self/clear_refs`), then
`--steps` AdamW steps of the run's objective (next-token loss plus KL to a float teacher, as
the experiments train, the teacher a float copy or under LoRA the model itself seen as float;
SmolLM2 with activation checkpointing) are timed and the training peak read (VmHWM). Full and
LoRA of one model run back to back on the same random token batch.

Metric (`--metric`): per seed, the float GPT (results.py's Shakespeare protocol), then from that
checkpoint PTQ (RTN) w4g32, QAT w4g32 and LoRA-QAT w4g32_lora, all exported and parity-gated;
the recovered share is `(ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_float)`.

    .venv/bin/python benchmarks/lora.py --models gpt smollm2 --steps 6
    .venv/bin/python benchmarks/lora.py --metric --seeds 0 1 2

Writes benchmarks/results/lora/{cost,metric}.{md,csv}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
OUT = ROOT / "benchmarks" / "results" / "lora"
MODELS = {
    # name: (description, recipes full / LoRA, batch, context)
    "gpt": ("Shakespeare GPT small", ("w4g32", "w4g32_lora"), 16, 128),
    "smollm2": ("SmolLM2-135M", ("q4_0", "q4_0_lora"), 4, 256),
}


def _build(model: str):
    from qat.models.hf import enable_activation_checkpointing
    from qat.models.registry import build_model

    if model == "gpt":
        return build_model("gpt", preset="small", vocab_size=85, block_size=128), 85
    m = build_model("hf_gguf", path=None)
    enable_activation_checkpointing(m)
    return m, m.config.vocab_size


def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(model: str, recipe: str, steps: int) -> dict[str, Any]:
    """One (model, recipe) in this process: trainable parameters, step time, training peak."""
    import torch
    import torch.nn.functional as F

    import qat
    from qat.quant import calibrate
    from qat.quant.control import disable_observer
    from qat.quant.float_view import float_view
    from qat.train.objectives import kd_loss

    torch.manual_seed(0)
    _, _, batch, ctx = MODELS[model]
    float_model, vocab = _build(model)
    recipe_ = qat.Recipe.from_yaml(ROOT / "configs" / "recipe" / f"{recipe}.yaml")
    # As the runs distil: a float copy, or under LoRA the model itself seen as float.
    copied = None if recipe_.lora else copy.deepcopy(float_model).eval().requires_grad_(False)
    m = qat.prepare(float_model, recipe_).train()
    ids = torch.randint(0, vocab, (batch, ctx + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]

    def logits(net):
        out = net(x)
        return out.logits if hasattr(out, "logits") else out

    calibrate(m, [x], num_batches=1, forward=lambda net, b: logits(net))
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    freeze = recipe_.schedule.steps(steps)["freeze_observers"]  # as the run's schedule does
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    times = []
    for step in range(steps):
        if step == freeze:
            m.apply(disable_observer)
        t0 = time.perf_counter()
        with torch.no_grad(), (contextlib.nullcontext() if copied else float_view(m)):
            t = logits(copied or m)
        out = logits(m)
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten()) + kd_loss(out, t, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"model": model, "recipe": recipe, "trainable": sum(p.numel() for p in params),
            "params": sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()),
            "step_s": statistics.median(times[1:] or times), "peak_kb": _vm_hwm_kb(),
            "batch": f"{batch} x {ctx}", "steps": steps}  # fmt: skip


def cost(models: list[str], steps: int) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        for recipe in MODELS[model][1]:
            cmd = [sys.executable, __file__, "--child", model, recipe, str(steps)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{model} {recipe} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{model} {recipe}: {r['trainable']:,} trainable, {r['step_s']:.2f} s/step, "
                  f"peak {r['peak_kb'] / 1e6:.2f} GB", flush=True)
    return rows


def cost_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | recipe | trainable params (share of full QAT's) | training peak RAM (GB) "
             "| step (s) | batch |", "|---|---|---|---|---|---|"]
    full: dict[str, dict[str, Any]] = {}
    for r in rows:
        full.setdefault(r["model"], r)
        f = full[r["model"]]
        ram = f"{r['peak_kb'] / 1e6:.2f}"
        step = f"{r['step_s']:.2f}"
        if r is not f:
            ram += f" ({r['peak_kb'] / f['peak_kb'] - 1:+.0%})"
            step += f" ({r['step_s'] / f['step_s']:.2f}x)"
        lines.append(f"| {MODELS[r['model']][0]} | {r['recipe']} | {r['trainable']:,} "
                     f"({r['trainable'] / f['trainable']:.1%}) | {ram} | {step} | {r['batch']} |")
    return "\n".join(lines) + "\n"


def metric(seeds: list[int], runs_dir: Path) -> list[dict[str, Any]]:
    import results

    spec = results.TASKS["shakespeare"]
    base = [f"experiment={spec['experiment']}", *results.QUIET, *spec["overrides"]]
    rows = []
    for seed in seeds:
        root, s = runs_dir / f"seed{seed}", [f"seed={seed}"]
        fl = results.one_run(base + s + ["recipe=fp32", "trainer.max_steps=0"], root / "float")
        init = [f"init_from={root / 'float' / 'float' / 'checkpoints' / 'last.ckpt'}"]
        rows.append({"seed": seed, "method": "float", "test": fl["float"]["test/ppl"]})
        for method, over in (("PTQ w4g32", ["recipe=w4g32", "trainer.max_steps=0"]),
                             ("QAT w4g32", ["recipe=w4g32"]),
                             ("LoRA-QAT w4g32_lora", ["recipe=w4g32_lora"])):  # fmt: skip
            res = results.one_run(base + s + init + over, root / method.split()[0])
            rows.append({"seed": seed, "method": method, "test": res["export"]["test/ppl"],
                         "seconds": round(res["seconds"], 1)})  # fmt: skip
            print(f"seed {seed} {method}: test ppl {rows[-1]['test']:.4f}", flush=True)
    return rows


def metric_table(rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(float(r["test"]))
    seeds = sorted({r["seed"] for r in rows})

    def rec(method: str) -> list[float]:
        out = []
        for s in seeds:
            v = {r["method"]: float(r["test"]) for r in rows if r["seed"] == s}
            out.append((v["PTQ w4g32"] - v[method]) / (v["PTQ w4g32"] - v["float"]))
        return out

    lines = [f"| method | test ppl (mean ± std, {len(seeds)} seeds) | share of the PTQ gap "
             "recovered |", "|---|---|---|"]
    for method, vals in by.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        share = "-"
        if method.startswith(("QAT", "LoRA")):
            share = f"{statistics.mean(rec(method)):.0%}"
        lines.append(f"| {method} | {statistics.mean(vals):.3f} ± {sd:.3f} | {share} |")
    return "\n".join(lines) + "\n"


def _write(name: str, rows: list[dict[str, Any]], table: str) -> None:
    import csv

    OUT.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (OUT / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (OUT / f"{name}.md").write_text(table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--models", nargs="*", choices=sorted(MODELS), default=[])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per (model, recipe)")
    ap.add_argument("--metric", action="store_true", help="train the GPT: PTQ, QAT, LoRA-QAT")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "outputs" / "benchmarks" / "lora")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "RECIPE", "STEPS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return
    if args.models:
        rows = cost(args.models, args.steps)
        _write("cost", rows, cost_table(rows))
    if args.metric:
        rows = metric(args.seeds, args.runs_dir)
        _write("metric", rows, metric_table(rows))


if __name__ == "__main__":
    main()
