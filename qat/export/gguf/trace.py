"""A traced llama.cpp run: each token row's logits plus the activation every weight matmul
read, taken from llama.cpp's own compute graph through its eval callback.

llama.cpp quantizes a Q4_0 / Q8_0 matmul's activation (`src[1]` of the `MUL_MAT` node) to Q8_0
blocks inside the kernel, so these inputs are exactly what its quantizer rounded. The GGUF gate
hands them to the integer model's tie aligner: a rounding tie that fp32 summation order cannot
decide is then decided as llama.cpp decided it (see `parity`).

The callback sees a `struct ggml_tensor *`; its fields are read through `_GgmlTensor`, ggml's
struct as `ggml.h` of the pinned llama-cpp-python declares it, checked on every node against
ggml's own `ggml_get_name` so that a changed layout is an error, never a silent misread.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

_F32 = 0  # ggml_type GGML_TYPE_F32


class _GgmlTensor(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int),
                ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
                ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
                ("padding", ctypes.c_char * 8)]  # fmt: skip


def _ggml() -> Any:
    from llama_cpp._ggml import libggml

    libggml.ggml_op_name.restype, libggml.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    libggml.ggml_get_name.restype = ctypes.c_char_p
    libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    return libggml


class MatmulInputs:
    """The eval callback: records `src[1]` of every `MUL_MAT` whose weight (`src[0]`) is one of
    `weights` (GGUF tensor names) as a `(1, T, K)` fp32 tensor, in call order per weight."""

    def __init__(self, weights: set[str]) -> None:
        self.weights, self.lib = weights, _ggml()
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.callback = self._make_callback()  # kept alive as long as the context uses it

    def _make_callback(self) -> Any:
        import llama_cpp

        def on_node(t: int, ask: bool, _user: Any) -> bool:
            node = _GgmlTensor.from_address(t)
            if self.lib.ggml_op_name(node.op) != b"MUL_MAT":
                return False
            name = _GgmlTensor.from_address(node.src[0]).name.decode()
            if name not in self.weights:
                return False
            if not ask:  # the node ran: its input is still in the compute buffer
                self._record(name, node.src[1])
            return True

        return llama_cpp.ggml_backend_sched_eval_callback(on_node)

    def _record(self, weight: str, address: int) -> None:
        x = _GgmlTensor.from_address(address)
        if self.lib.ggml_get_name(address) != x.name:
            raise RuntimeError("llama.cpp's ggml_tensor layout differs from qat's reading of it "
                               "(llama-cpp-python other than the pinned version?)")  # fmt: skip
        k, t = x.ne[0], x.ne[1]
        if x.type != _F32 or x.ne[2] * x.ne[3] != 1 or x.nb[0] != 4:
            raise RuntimeError(f"llama.cpp's input to {weight} is not a plain F32 matrix")
        flat = (ctypes.c_char * (x.nb[1] * t)).from_address(x.data)
        rows = np.frombuffer(flat, np.float32).reshape(t, x.nb[1] // 4)[:, :k]
        self.seen.setdefault(weight, []).append(torch.from_numpy(rows.copy())[None])

    def take(self) -> dict[str, list[torch.Tensor]]:
        """What was recorded since the last `take`."""
        seen, self.seen = self.seen, {}
        return seen


class TracedContext:
    """A second llama.cpp context on `llm`'s model (its context parameters: F32 KV cache and
    so on) with `MatmulInputs` as its eval callback; `run(row)` -> logits and inputs."""

    def __init__(self, llm: Any, weights: set[str]) -> None:
        import llama_cpp

        self.api, self.n_vocab = llama_cpp, llm.n_vocab()
        self.inputs = MatmulInputs(weights)
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.cb_eval = self.inputs.callback
        params.n_batch = params.n_ubatch = params.n_ctx  # one graph per row
        self.n_ctx = params.n_ctx
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a traced context")
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)

    def run(self, row: list[int]) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """`(T, vocab)` logits of token row `row` from an empty cache, and the matmul inputs."""
        api, b, n = self.api, self.batch, len(row)
        if n > self.n_ctx:
            raise ValueError(f"a row of {n} tokens exceeds the traced context's {self.n_ctx}")
        api.llama_memory_clear(api.llama_get_memory(self.ctx), True)
        b.n_tokens = n
        for i, tok in enumerate(row):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, True
            b.seq_id[i][0] = 0
        if api.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama.cpp failed to decode a traced row")
        flat = np.ctypeslib.as_array(api.llama_get_logits(self.ctx), shape=(n * self.n_vocab,))
        return torch.from_numpy(flat.reshape(n, self.n_vocab).copy()), self.inputs.take()

    def close(self) -> None:
        if self.ctx:
            self.api.llama_batch_free(self.batch)
            self.api.llama_free(self.ctx)
            self.ctx = None
