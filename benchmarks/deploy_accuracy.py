"""Accuracy of int8 deployment on trained models and real held-out data, beside what a user would
run instead: fp32 (ONNX Runtime), this project's int8 export (w8a8, calibrated PTQ, target
`any`, under ONNX Runtime), ONNX Runtime's own `quantize_dynamic` of the fp32 file, and
torch's `quantize_dynamic` (int8 Linears, in PyTorch). Speed of the same methods:
`benchmarks/onnx_speed.py`. QAT (trained with fake quant) beats calibrated PTQ: see the results
tables; this one compares deployment paths from the same float model.

    .venv/bin/python benchmarks/deploy_accuracy.py [--gpt-steps 300] [--threads 2]

digits: the ResNet trained 300 steps, test accuracy (270 images). gpt: GPT small trained on
Shakespeare for --gpt-steps, test perplexity on 64 held-out blocks of 128 characters. minilm:
the pretrained MiniLM, mean cosine similarity to its fp32 embeddings on 500 held-out sentences.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Iterator
from itertools import cycle, islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from onnx_speed import TorchRunner, fp32_onnx, int8_onnx, ort_dynamic, torch_dynamic
from torch import nn

from qat.data import DigitsDataModule, SentencesDataModule, ShakespeareDataModule
from qat.export.onnx import ort_session
from qat.export.onnx.cpu import cpu_family, describe
from qat.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fp32", "qat int8", "ORT dynamic", "torch dynamic")


def train(model: nn.Module, batches: Iterator[dict], steps: int, lr: float) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for batch in islice(batches, steps):
        logits = model(batch["x"])
        loss = F.cross_entropy(logits.flatten(0, -2), batch["y"].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def runners(model: nn.Module, calib: list[tuple], names: list[str], threads: int) -> dict:
    """method -> callable(feeds) -> first output as a tensor."""
    with torch.no_grad():
        fp32 = fp32_onnx(model, calib[0], names)
        qdq, _ = int8_onnx(model_copy(model), "w8a8", calib, names)
    sessions = {
        "fp32": ort_session(fp32, threads),
        "qat int8": ort_session(qdq, threads),
        "ORT dynamic": ort_session(ort_dynamic(fp32), threads),
        "torch dynamic": TorchRunner(torch_dynamic(model_copy(model)), names),
    }

    def call(s: object) -> Callable:
        def run(feeds: dict) -> torch.Tensor:
            out = s.run(None, feeds)
            out = out[0] if isinstance(out, (list, tuple)) else out
            out = getattr(out, "last_hidden_state", out)
            return torch.as_tensor(np.asarray(out) if not torch.is_tensor(out) else out)

        return run

    return {m: call(s) for m, s in sessions.items()}


def model_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def digits(threads: int, data_dir: Path) -> tuple[str, dict[str, float]]:
    dm = DigitsDataModule(data_dir=str(data_dir), batch_size=64)
    dm.setup()
    torch.manual_seed(0)
    model = train(build_model("cnn"), cycle(dm.train_dataloader()), 300, 3e-3)
    calib = [(b["x"],) for b in islice(dm.train_dataloader(), 20)]
    run = runners(model, calib, ["input"], threads)
    out = {}
    for method, f in run.items():
        hits = [(f({"input": b["x"].numpy()}).argmax(-1) == b["y"]) for b in dm.test_dataloader()]
        out[method] = float(torch.cat(hits).float().mean())
    return "test accuracy", out


def gpt(threads: int, data_dir: Path, steps: int) -> tuple[str, dict[str, float]]:
    dm = ShakespeareDataModule(data_dir=str(data_dir), batch_size=16, block_size=128,
                               max_eval_blocks=64)  # fmt: skip
    dm.setup()
    torch.manual_seed(0)
    model = build_model("gpt", preset="small", vocab_size=dm.vocab_size, block_size=128)
    model = train(model, cycle(dm.train_dataloader()), steps, 2e-3)
    calib = [(b["x"],) for b in islice(dm.train_dataloader(), 8)]
    run = runners(model, calib, ["input"], threads)
    out = {}
    for method, f in run.items():
        nll = [F.cross_entropy(f({"input": b["x"].numpy()}).flatten(0, 1), b["y"].flatten(),
                               reduction="sum") for b in dm.test_dataloader()]  # fmt: skip
        tokens = sum(b["y"].numel() for b in dm.test_dataloader())
        out[method] = math.exp(float(sum(nll)) / tokens)
    return "test perplexity", out


def minilm(threads: int, data_dir: Path) -> tuple[str, dict[str, float]]:
    dm = SentencesDataModule(data_dir=str(data_dir), batch_size=32, max_length=64,
                             pad_to_max_length=True)  # fmt: skip
    dm.setup()
    model = build_model("minilm").eval()
    names = ["input_ids", "attention_mask"]
    calib = [(b["input_ids"], b["attention_mask"]) for b in islice(dm.train_dataloader(), 8)]
    run = runners(model, calib, names, threads)
    feeds = [{n: b[n].numpy() for n in names} for b in dm.test_dataloader()]
    ref = [run["fp32"](f) for f in feeds]
    return "cosine to fp32", {
        m: float(torch.cat([F.cosine_similarity(f(x), r, dim=-1) for x, r in zip(feeds, ref,
                 strict=True)]).mean()) for m, f in run.items()  # fmt: skip
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--gpt-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="digits,gpt,minilm")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data_cache")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice
    torch.set_num_threads(args.threads)
    print(f"CPU kernel family: {describe(cpu_family())}; int8 methods from the same float "
          "model\n")
    print("| model | metric | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    jobs = {"digits": lambda: digits(args.threads, args.data_dir),
            "gpt": lambda: gpt(args.threads, args.data_dir, args.gpt_steps),
            "minilm": lambda: minilm(args.threads, args.data_dir)}  # fmt: skip
    for name in args.models.split(","):
        metric, values = jobs[name]()
        cells = " | ".join(f"{values[m]:.4f}" for m in METHODS)
        print(f"| {name} | {metric} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
