"""Forward+backward time of nn.Linear(1024, 1024) on a batch of 256: fp32 vs W4 per-channel LSQ
weights with A8 per-tensor activations, interleaved in one run. Prints the median ratio.

    .venv/bin/python benchmarks/fake_quant_overhead.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qat.quant import QuantSpec
from qat.quant.modules import QATLinear


def step_time(layer: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    layer(x).sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.features
    fp32 = nn.Linear(n, n)
    qat = QATLinear.from_float(
        nn.Linear(n, n),
        weight=QuantSpec(bits=4, granularity="per_channel", learn="lsq"),
        input=QuantSpec(bits=8, symmetric=False, observer="ema"),
        name="fc",
    )
    x = torch.randn(args.batch, n, requires_grad=True)
    for _ in range(5):  # warm-up; also calibrates the quantizers
        step_time(fp32, x), step_time(qat, x)
    ratios, t_fp, t_q = [], [], []
    for _ in range(args.repeats):
        a, b = step_time(fp32, x), step_time(qat, x)
        t_fp.append(a), t_q.append(b), ratios.append(b / a)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"Linear({n}, {n}), batch {args.batch}, {args.repeats} interleaved pairs"
    )
    print(
        f"fp32 median {statistics.median(t_fp) * 1e3:.2f} ms, "
        f"W4A8 fake-quant median {statistics.median(t_q) * 1e3:.2f} ms"
    )
    print(f"median ratio (fake-quant / fp32): {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
