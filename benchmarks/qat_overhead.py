"""QAT training overhead: optimizer-step time with fake quant over float step time, per model,
float and QAT steps interleaved in one run (median ratio).

    .venv/bin/python benchmarks/qat_overhead.py [--steps 30] [--models cnn cnn32 gpt minilm]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import qat  # noqa: E402
from qat.models.registry import build_model  # noqa: E402


def cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    # Models are built lazily: only those asked for with --models.
    yield ("cnn", "CNN (digits, batch 64)", lambda: build_model("cnn"), "w4a4_lsq",
           lambda m: F.cross_entropy(m(x), y))
    # The same ResNet at CIFAR-like size: per-quantizer fixed costs amortize over larger maps.
    x32 = torch.randn(64, 3, 32, 32, generator=g)
    yield ("cnn32", "CNN (3x32x32, widths 64/128, batch 64)",
           lambda: build_model("cnn", in_channels=3, widths=[64, 128]), "w4a4_lsq",
           lambda m: F.cross_entropy(m(x32), y))
    ids = torch.randint(0, 85, (16, 128), generator=g)
    yield ("gpt", "GPT small (16 x 128 tokens)",
           lambda: build_model("gpt", preset="small", vocab_size=85, block_size=128), "w4g32_a8dyn",
           lambda m: F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()))
    tok = torch.randint(1000, 20000, (32, 32), generator=g)
    mask = torch.ones_like(tok)
    yield ("minilm", "MiniLM (32 x 32 tokens)", lambda: build_model("minilm"), "w8a8",
           lambda m: m(tok, mask).pow(2).mean())


def measure(name, model, recipe, loss_fn, steps):
    fl = model.train()
    qm = qat.prepare(copy.deepcopy(model), ROOT / "configs" / "recipe" / f"{recipe}.yaml").train()
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (fl, qm)}

    def step(m) -> float:
        t0 = time.perf_counter()
        opts[id(m)].zero_grad(set_to_none=True)
        loss_fn(m).backward()
        opts[id(m)].step()
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up (the first QAT step also calibrates)
        step(fl), step(qm)
    tf, tq = [], []
    for _ in range(steps):
        tf.append(step(fl))
        tq.append(step(qm))
    ratios = [b / a for a, b in zip(tf, tq, strict=True)]
    return (name, recipe, statistics.median(tf) * 1e3, statistics.median(tq) * 1e3,
            statistics.median(ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--steps", type=int, default=30,
                    help="interleaved float/QAT step pairs per model (default 30)")
    ap.add_argument("--models", nargs="+", choices=["cnn", "cnn32", "gpt", "minilm"],
                    default=["cnn", "cnn32", "gpt", "minilm"])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} interleaved step pairs per model\n")
    print("| model | recipe | float step (ms) | QAT step (ms) | median ratio |")
    print("|---|---|---|---|---|")
    for key, name, build, recipe, loss_fn in cases():
        if key not in args.models:
            continue
        name, recipe, f_ms, q_ms, ratio = measure(name, build(), recipe, loss_fn, args.steps)
        print(f"| {name} | {recipe} | {f_ms:.1f} | {q_ms:.1f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
