"""CPU latency of int8 deployment against fp32, beside what a user would run instead: the
fp32 ONNX export under ONNX Runtime, this project's int8 QDQ export (`export_onnx`, target
`any`), ONNX Runtime's own dynamic quantization of the fp32 file
(`onnxruntime.quantization.quantize_dynamic`) and torch's CPU int8 path
(`torch.ao.quantization.quantize_dynamic` on the Linears, run in PyTorch), for the digits CNN
(1x8x8), the same ResNet at 3x32x32, the GPT (small, block 128) and MiniLM, at batch 1 and 32.
Runs are interleaved in one process; the table shows each median and the median of the
per-run ratios fp32 / method (> 1: faster than fp32).

    .venv/bin/python benchmarks/onnx_speed.py [--recipe w8a8] [--repeats 20] [--threads 2]
    .venv/bin/python benchmarks/onnx_speed.py --parity   # exactness: ORT vs the executor

Accuracy of the same methods on trained models and real data: `benchmarks/deploy_accuracy.py`.
The int8 models here are calibrated (not trained) on real text for MiniLM (Shakespeare
sentences) and random inputs otherwise: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import io
import logging
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import qat
from qat.export.onnx import export_onnx, ort_session
from qat.export.onnx.cpu import cpu_family, describe
from qat.models.registry import build_model

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipe"
Inputs = tuple[torch.Tensor, ...]


def _sentences(n: int) -> list[str]:
    try:
        from qat.data.plays import cut_sentences, play_files, read_play

        text = read_play(next(iter(play_files().values())))
        return cut_sentences(text)[:n]
    except Exception:  # the Shakespeare package is optional: fall back to a fixed sentence
        return ["the quick brown fox jumps over the lazy dog"] * n


def cases(seq_gpt: int, seq_minilm: int) -> dict[str, tuple[Callable[[], nn.Module], Callable]]:
    """name -> (builder, make_inputs(batch, generator))."""

    def minilm_inputs(batch: int, g: torch.Generator) -> Inputs:
        from qat.pretrained import load_tokenizer, minilm_path

        tok = load_tokenizer(minilm_path())
        off = int(torch.randint(0, 64, (), generator=g))
        enc = tok(_sentences(off + batch)[off:], padding="max_length", truncation=True,
                  max_length=seq_minilm, return_tensors="pt")  # fmt: skip
        return enc["input_ids"], enc["attention_mask"]

    return {
        "cnn": (lambda: build_model("cnn"),
                lambda b, g: (torch.randn(b, 1, 8, 8, generator=g),)),
        "cnn32": (lambda: build_model("cnn", in_channels=3, widths=[64, 128]),
                  lambda b, g: (torch.randn(b, 3, 32, 32, generator=g),)),
        "gpt": (lambda: build_model("gpt", preset="small", vocab_size=67, block_size=128),
                lambda b, g: (torch.randint(0, 67, (b, seq_gpt), generator=g),)),
        "minilm": (lambda: build_model("minilm"), minilm_inputs),
    }  # fmt: skip


def fp32_onnx(model: nn.Module, inputs: Inputs, names: list[str]) -> bytes:
    axes = {n: ({0: "batch", 1: "sequence"} if x.ndim == 2 and not x.is_floating_point()
                else {0: "batch"}) for n, x in zip(names, inputs, strict=True)}  # fmt: skip
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buf, dynamo=False, opset_version=21, input_names=names,
                          dynamic_axes=axes, do_constant_folding=True)  # fmt: skip
    return buf.getvalue()


def ort_dynamic(fp32: bytes) -> bytes:
    """ONNX Runtime's own dynamic int8 quantization of the fp32 file (its defaults)."""
    from onnxruntime.quantization import quantize_dynamic

    d = Path(tempfile.mkdtemp())
    (d / "fp32.onnx").write_bytes(fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(d / "fp32.onnx", d / "dyn.onnx")
    return (d / "dyn.onnx").read_bytes()


def torch_dynamic(model: nn.Module) -> nn.Module:
    """torch's CPU int8 path: dynamic int8 Linears (fbgemm/x86 kernels), the rest fp32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear},
                                                      dtype=torch.qint8)


class TorchRunner:
    """`.run(None, feeds)` like an ONNX Runtime session, for a torch module."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model, self.names = model, names

    @torch.no_grad()
    def run(self, _outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        return self.model(*[torch.from_numpy(feeds[n]) for n in self.names])


def int8_onnx(
    model: nn.Module, recipe: str, calib: list[Inputs], names: list[str], target: str = "any"
) -> tuple[Path, nn.Module]:
    """Prepare with `recipe`, calibrate on `calib`, convert, export: (path, integer model)."""
    model = qat.prepare(model, RECIPES / f"{recipe}.yaml")
    qat.quant.calibrate(model, calib, len(calib), forward=lambda m, b: m(*b))
    int_model = qat.convert(model.eval())
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    return export_onnx(int_model, calib[0], path, input_names=names, target=target), int_model


def interleaved(sessions: list, feeds: dict, repeats: int) -> list[list[float]]:
    for s in sessions:  # warm-up
        for _ in range(3):
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for s, t in zip(sessions, times, strict=True):
            t0 = time.perf_counter()
            s.run(None, feeds)
            t.append(time.perf_counter() - t0)
    return times


def parity_rows(name: str, build: Callable, make: Callable, names: list[str], g) -> None:
    """ONNX Runtime against the integer executor, w8a8 and w7a8 (see `qat.export.onnx.cpu`)."""
    from qat.export.onnx.cpu import emulate
    from qat.export.onnx.parity import onnx_parity_report
    from qat.export.parity.measure import as_tensor
    from qat.export.parity.report import TensorParity

    for recipe in ("w8a8", "w7a8"):
        calib = [make(8, g) for _ in range(4)]
        path, int_model = int8_onnx(build().eval(), recipe, calib, names)
        batches = [make(8, g) for _ in range(2)]
        rep = onnx_parity_report(int_model, path, batches)
        emu = TensorParity("no VNNI")
        with torch.no_grad():
            for b in batches:
                ref = as_tensor(int_model(*b))
                with emulate(int_model, "avx2", "any"):
                    emu.add(ref, as_tensor(int_model(*b)), rows=True)
        free, layer = rep.free_running, max(t.rel for t in rep.layers)
        print(
            f"| {name} | {recipe} | {free.rel:.1e} | {rep.exact_share:.2f} | {free.top1:.4f} | "
            f"{free.min_cosine:.6f} | {layer:.1e} | {rep.aligned} | {emu.rel:.1e} | "
            f"{emu.top1:.4f} | {emu.min_cosine:.6f} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--recipe", default="w8a8", help="configs/recipe/<name>.yaml for int8")
    ap.add_argument("--models", default="cnn,cnn32,gpt,minilm")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-gpt", type=int, default=128)
    ap.add_argument("--seq-minilm", type=int, default=128)
    ap.add_argument("--target", default="any", choices=("any", "vnni", "avx2"),
                    help="export.onnx.target of the int8 file (vnni: int8 weights, VNNI CPUs)")
    ap.add_argument("--parity", action="store_true", help="exactness table instead of speed")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cpu = platform.processor() or platform.machine()
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {cpu}, "
          f"intra_op_num_threads={args.threads}\n")  # fmt: skip
    table = cases(args.seq_gpt, args.seq_minilm)
    models = args.models.split(",")
    if args.parity:
        print(
            "| model | recipe | rel (ORT vs executor) | bit-equal share | top-1 | min cos | "
            "max layer rel (aligned) | ties | no-VNNI rel (emulated) | top-1 | min cos |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name in models:
            names = ["input_ids", "attention_mask"] if name == "minilm" else ["input"]
            parity_rows(name, *table[name], names, g)
        return
    print(f"recipe {args.recipe} for qat int8 (calibrated, target {args.target}); {args.repeats} "
          f"interleaved runs; CPU kernel family: {describe(cpu_family())}\n")
    print("| model | batch | input | fp32 ms | qat int8 ms | speed-up | ORT dynamic ms | speed-up"
          " | torch fp32 ms | torch dynamic ms | speed-up (vs torch fp32) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice
    torch.set_num_threads(args.threads)
    for name in models:
        build, make = table[name]
        names = ["input_ids", "attention_mask"] if name == "minilm" else ["input"]
        calib = [make(8, g) for _ in range(4)]
        # Idle ONNX Runtime threads stop spinning: they would steal the cores from torch's runs.
        quiet = {"session.intra_op.allow_spinning": "0"}
        with torch.no_grad():
            qdq, _ = int8_onnx(build().eval(), args.recipe, calib, names, args.target)
            fp32 = fp32_onnx(build().eval(), calib[0], names)
            sessions = [
                ort_session(fp32, args.threads, config=quiet),
                ort_session(qdq, args.threads, config=quiet),
                ort_session(ort_dynamic(fp32), args.threads, config=quiet),
                TorchRunner(build().eval(), names),
                TorchRunner(torch_dynamic(build()), names),
            ]
        for batch in (int(b) for b in args.batches.split(",")):
            x = make(batch, g)
            feeds = {n: t.numpy() for n, t in zip(names, x, strict=True)}
            times = interleaved(sessions, feeds, args.repeats)
            cells = []
            for ref, t in ((0, 1), (0, 2), (3, 4)):
                ratio = statistics.median(
                    a / b for a, b in zip(times[ref], times[t], strict=True))
                cells += [f"{1e3 * np.median(times[t]):.2f}", f"{ratio:.2f}x"]
            cells.insert(4, f"{1e3 * np.median(times[3]):.2f}")
            shape = "x".join(str(d) for d in x[0].shape)
            print(f"| {name} | {batch} | {shape} | {1e3 * np.median(times[0]):.2f} | "
                  + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
