"""Q4_0 / Q8_0 blocks from an integer layer's codes and scales.

A weight spec that is symmetric, per group of 32, 4 or 8 bits, maps exactly onto llama.cpp's
Q4_0 / Q8_0: one fp16 scale per 32 weights and `value = code * scale` (Q4_0 stores `code + 8`
in nibbles: element j in the low nibble of byte j, element j + 16 in the high one). With
`scale_dtype: fp16` in the recipe the file holds exactly what was trained.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qat.export.integer.layer import IntLayer

BLOCK = 32


def gguf_type_for(mod: nn.Module, name: str) -> str:
    """`Q4_0`, `Q8_0` or `F32`: how an integer layer's weight (or a float module's) is stored."""
    s = mod.weight_spec if isinstance(mod, IntLayer) else None
    if s is None:
        return "F32"
    ok = s.symmetric and not s.narrow_range and s.granularity == "per_group"
    if ok and s.group_size == BLOCK and s.bits in (4, 8):
        if s.scale_dtype != "fp16":
            raise ValueError(
                f"{name}: GGUF stores fp16 block scales; train with scale_dtype: fp16 "
                "so the file holds exactly the trained weights"
            )
        return "Q4_0" if s.bits == 4 else "Q8_0"
    return "F32"


def q4_0_blocks(q: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """(out, in) codes in [-8, 7] and (out, in/32) scales -> (out, in/32 * 18) uint8."""
    out, n = q.shape
    nib = (q.reshape(out, n // BLOCK, BLOCK) + 8).to(torch.uint8).numpy()
    packed = nib[..., :16] | (nib[..., 16:] << 4)  # (out, G, 16)
    d = s.numpy().astype(np.float16).view(np.uint8).reshape(out, n // BLOCK, 2)
    return np.concatenate([d, packed], axis=-1).reshape(out, -1)


def q8_0_blocks(q: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """(out, in) int8 codes and (out, in/32) scales -> (out, in/32 * 34) uint8."""
    out, n = q.shape
    qs = q.reshape(out, n // BLOCK, BLOCK).numpy().view(np.uint8)
    d = s.numpy().astype(np.float16).view(np.uint8).reshape(out, n // BLOCK, 2)
    return np.concatenate([d, qs], axis=-1).reshape(out, -1)


def weight_array(mod: nn.Module, name: str) -> tuple[np.ndarray, str]:
    """`(array, GGUF type)` of a module's weight: packed blocks of the codes `convert` stored
    (what the parity gate checked), or F32 values."""
    kind = gguf_type_for(mod, name)
    if kind == "F32":
        data = mod.dequantized_weight() if isinstance(mod, IntLayer) else mod.weight
        return data.detach().float().numpy(), kind
    q, s = mod.int_weight().to(torch.int8), mod.weight_scale.float()  # (out, in), (out, G)
    return (q4_0_blocks(q, s) if kind == "Q4_0" else q8_0_blocks(q, s)), kind
