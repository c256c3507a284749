"""The parity gate for the GGUF target: llama.cpp itself against the integer executor.

llama.cpp's CPU dot products for Q4_0 / Q8_0 weights quantize the activations on the fly to
8-bit blocks of 32 (Q8_0). A model trained with `arithmetic: llama_cpp` inputs (recipes
`q4_0_llama`, `q8_0_llama`) computes the same in training and in the integer executor, so the
two agree up to float summation order: measured rel 1.0e-7, top-1 100% on the suite's 2-layer
Llama. Through 30 layers, though, summation order alone flips activation codes that compound
(free-running on SmolLM2 after `task=ptq recipe=q4_0_llama`: rel 8e-2, top-1 89% on 128
tokens, as far apart as qat's own fake-quant and integer models run without tie alignment).

So the gate, like qat's own (`qat.export.parity.measure`), runs the integer model twice per row.
The *free-running* run is reported as it is. In the *aligned* run, each `llama_cpp`-arithmetic
input whose value lies within `tie_tolerance` quantization steps of the activation llama.cpp's
own matmul read (`trace.TracedContext`) quantizes llama.cpp's value instead, so rounding ties
are decided as llama.cpp decided them; anything larger than a tie still propagates. A model
whose every quantized matmul runs under llama.cpp's arithmetic must then agree within
`ALIGNED_MAX_REL` with full top-1 agreement (measured on SmolLM2: rel 2.5e-7, top-1 100%, 170
codes aligned in 128 tokens, the farthest 4e-4 steps from its tie). A model whose activations
stay float in training differs by the rounding llama.cpp adds, and its free-running run is
bounded by `MAX_REL`, `MIN_TOP1` (rel 1.2e-2 to 1.4e-2 on the tiny Llama, 4.6e-2 with top-1
96.3% on SmolLM2 after `experiment=smollm2_q4_0`). llama.cpp runs with its KV cache in F32 (its
default F16 cache alone adds rel ~1e-2), and a file that fails is removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.export.gguf.layout import layout_of
from qat.export.gguf.trace import TracedContext
from qat.export.integer.layer import IntLayer
from qat.export.parity.align import Aligner, aligned
from qat.export.parity.report import ParityError, TensorParity

MAX_REL = 0.1
MIN_TOP1 = 0.9
ALIGNED_MAX_REL = 1e-4
TIE_TOLERANCE = 0.01  # quantization steps, as qat's own gate
GGML_TYPE_F32 = 0  # llama.cpp's `ggml_type` for an F32 KV cache


@contextlib.contextmanager
def llama_model(path: str | Path, n_ctx: int, threads: int | None = None, **kw: Any):
    """GGUF file `path` opened in llama.cpp with every position's logits kept, closed on exit
    (`kw`: more `llama_cpp.Llama` options, e.g. `vocab_only=True`)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                          n_threads=threads or torch.get_num_threads(), **kw)  # fmt: skip
    try:
        yield llm
    finally:
        llm.close()


@dataclass
class GGUFParity:
    """llama.cpp's logits against the integer model's: free-running, and with rounding ties
    decided as llama.cpp decided them (`aligned_codes` activation codes changed, the farthest
    `max_tie_distance` steps from llama.cpp's value) on the `traced_layers` that quantize
    their inputs as llama.cpp does; `exact` when those are all the quantized matmuls."""

    free_running: TensorParity = field(default_factory=lambda: TensorParity("llama.cpp logits"))
    aligned: TensorParity = field(default_factory=lambda: TensorParity("llama.cpp logits"))
    traced_layers: int = 0
    exact: bool = False
    aligned_codes: int = 0
    max_tie_distance: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.free_running.to_dict(), "aligned": self.aligned.to_dict(),
                "traced_layers": self.traced_layers, "exact": self.exact,
                "aligned_codes": self.aligned_codes,
                "max_tie_distance": self.max_tie_distance}  # fmt: skip


def traced_layers(int_model: nn.Module) -> tuple[dict[str, str], bool]:
    """GGUF weight name -> module path of each integer layer whose input is quantized as
    llama.cpp quantizes a matmul's activation (`arithmetic: llama_cpp`), and whether those are
    all of the model's integer matmuls (the token embedding is a lookup, not a matmul)."""
    traced, matmuls = {}, 0
    for gguf_name, path, _, _ in layout_of(int_model).tensors():
        layer = int_model.get_submodule(path)
        if gguf_name == "token_embd.weight" or not isinstance(layer, IntLayer):
            continue
        matmuls += 1
        if layer.input_spec is not None and layer.input_spec.arithmetic == "llama_cpp":
            traced[gguf_name] = path
    return traced, bool(traced) and len(traced) == matmuls


@torch.no_grad()
def gguf_parity(
    int_model: nn.Module,
    path: str | Path,
    tokens: Iterable[torch.Tensor],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    threads: int | None = None,
    tie_tolerance: float = TIE_TOLERANCE,
) -> GGUFParity:
    """llama.cpp's logits of GGUF file `path` against `int_model`'s on each row of each
    `(B, T)` token batch (each row from an empty KV cache). `forward(model, ids)` -> logits."""
    batches = [t.reshape(-1, t.shape[-1]) for t in tokens]
    run = forward or (lambda m, ids: m(ids))
    traced, exact = traced_layers(int_model)
    names = {id(int_model.get_submodule(p)): p for p in traced.values()}
    result = GGUFParity(traced_layers=len(traced), exact=exact)
    n_ctx = max(t.shape[-1] for t in batches)
    with llama_model(path, n_ctx, threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) as llm:
        ctx = TracedContext(llm, set(traced))
        try:
            for batch in batches:
                for row in batch:
                    got, inputs = ctx.run(row.tolist())
                    result.free_running.add(run(int_model, row[None])[0].float(), got, rows=True)
                    records = {(p, "input"): inputs.get(g, []) for g, p in traced.items()}
                    aligner = Aligner(records, names, tie_tolerance)
                    with aligned(int_model, traced.values(), aligner):
                        result.aligned.add(run(int_model, row[None])[0].float(), got, rows=True)
                    result.aligned_codes += aligner.aligned
                    result.max_tie_distance = max(result.max_tie_distance, aligner.max_distance)
        finally:
            ctx.close()
    return result


def gate_gguf(
    int_model: nn.Module,
    path: str | Path,
    tokens: list[torch.Tensor],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    max_rel: float = MAX_REL,
    min_top1: float = MIN_TOP1,
    aligned_max_rel: float = ALIGNED_MAX_REL,
) -> dict[str, Any]:
    """`gguf_parity` as the export gate: a `ParityError` naming the figures (and the file
    removed) when a model under llama.cpp's arithmetic (`exact`), ties aligned, is above
    `aligned_max_rel` or below full top-1 agreement, or any other model's free-running run is
    above `max_rel` or below `min_top1`; its dict otherwise."""
    result = gguf_parity(int_model, path, tokens, forward)
    free, tied = result.free_running, result.aligned
    if result.exact and not (tied.rel <= aligned_max_rel and tied.top1 == 1.0):
        bad = (f"with rounding ties decided as llama.cpp decided them ({result.aligned_codes} "
               f"codes) by rel {tied.rel:.3e} (bound {aligned_max_rel:g}), top-1 agreement "
               f"{tied.top1:.4f} (bound 1)")  # fmt: skip
    elif not result.exact and not (free.rel <= max_rel and (free.top1 or 0.0) >= min_top1):
        bad = (f"by rel {free.rel:.3e} (bound {max_rel:g}), top-1 agreement {free.top1:.4f} "
               f"(bound {min_top1:g})")
    else:
        return result.to_dict()
    Path(path).unlink(missing_ok=True)
    raise ParityError(f"GGUF parity gate failed for {path}: llama.cpp's logits differ from the "
                      f"integer model's {bad}")
