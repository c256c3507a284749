"""The parity gate for the GGUF target: llama.cpp itself against the integer executor.

llama.cpp's CPU dot products for Q4_0 / Q8_0 weights quantize the activations on the fly to
8-bit blocks of 32 (Q8_0). A model trained with `arithmetic: llama_cpp` inputs (recipes
`q4_0_llama`, `q8_0_llama`) computes the same in training and in the integer executor, so the
two agree up to float summation order: measured rel 1.0e-7, top-1 100% on the suite's 2-layer
Llama. Through 30 layers, though, summation order alone flips activation codes that compound:
on SmolLM2 after `experiment=smollm2_q4_0 recipe=q4_0_llama` rel 4.5e-2, top-1 96.0% (the
fake-quant and integer models differ as much when not tie-aligned: rel 5.0e-2, top-1 96.3%).
Models whose activations stay float differ by the rounding llama.cpp adds: rel 1.2e-2 to
1.4e-2 on the tiny Llama, 4.6e-2 with top-1 96.3% on SmolLM2 after `experiment=smollm2_q4_0`.
The gate bounds both by `MAX_REL`, `MIN_TOP1`; llama.cpp runs with its KV cache in F32 here
(its default F16 cache alone adds rel ~1e-2), and a file that fails is removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.export.parity.report import ParityError, TensorParity

MAX_REL = 0.1
MIN_TOP1 = 0.9
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


@torch.no_grad()
def gguf_parity(
    int_model: nn.Module,
    path: str | Path,
    tokens: Iterable[torch.Tensor],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    threads: int | None = None,
) -> TensorParity:
    """llama.cpp's logits of GGUF file `path` against `int_model`'s on each row of each
    `(B, T)` token batch (each row from an empty KV cache). `forward(model, ids)` -> logits."""
    batches = [t.reshape(-1, t.shape[-1]) for t in tokens]
    run = forward or (lambda m, ids: m(ids))
    result = TensorParity("llama.cpp logits")
    n_ctx = max(t.shape[-1] for t in batches)
    with llama_model(path, n_ctx, threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) as llm:
        for batch in batches:
            for row in batch:
                llm.reset()
                llm.eval(row.tolist())
                got = torch.tensor(llm.scores[: row.numel()])
                result.add(run(int_model, row[None])[0].float(), got, rows=True)
    return result


def gate_gguf(
    int_model: nn.Module,
    path: str | Path,
    tokens: list[torch.Tensor],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    max_rel: float = MAX_REL,
    min_top1: float = MIN_TOP1,
) -> dict[str, Any]:
    """`gguf_parity` as the export gate: a `ParityError` naming the figures (and the file
    removed) above `max_rel` or below `min_top1`; its dict otherwise."""
    result = gguf_parity(int_model, path, tokens, forward)
    if not (result.rel <= max_rel and (result.top1 or 0.0) >= min_top1):
        Path(path).unlink(missing_ok=True)
        raise ParityError(f"GGUF parity gate failed for {path}: llama.cpp's logits differ from "
                          f"the integer model's by rel {result.rel:.3e} (bound {max_rel:g}), "
                          f"top-1 agreement {result.top1:.4f} (bound {min_top1:g})")  # fmt: skip
    return result.to_dict()
