"""What ONNX Runtime's u8s8 integer kernels compute on x86 CPUs without VNNI, emulated.

MLAS's AVX2 (and AVX-512 without VNNI) u8s8 GEMM multiplies uint8 activation codes by int8
weight codes with `vpmaddubsw`, which adds each pair of neighbouring products (k = 2j, 2j+1)
into an int16 with saturation, then widens to int32. A pair saturates once
`|a0*w0 + a1*w1| > 32767`, possible with full-range 8-bit weights (255 * 127 * 2 = 64770) and
impossible when every weight code lies in [-64, 64] (255 * 128 = 32640): 7-bit weights.
With VNNI (`vpdpbusd`) the products are summed in int32 and nothing saturates.

`emulate_no_vnni(int_model)` makes the integer executor's Linear layers compute that way, to
measure on any CPU what full-range weights would cost on one without VNNI.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from qat.export.int_layers import IntLinear

INT16_MIN, INT16_MAX = -32768, 32767


def cpu_has_vnni() -> bool:
    """Whether ONNX Runtime's u8s8 kernels are exact at 8 bits on this CPU: x86 with
    AVX512-VNNI or AVX-VNNI (read from /proc/cpuinfo), or not x86 at all (no `vpmaddubsw`).
    False when it cannot tell."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def pair_saturated_matmul(a: torch.Tensor, w: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """`a @ w` for uint8 codes `a` (M, K) and int8 codes `w` (K, N), each pair of products
    (k = 2j, 2j+1) saturated to int16 before the int32 sum, as `vpmaddubsw` does. int64 out.

    Example:
        >>> a = torch.tensor([[255, 255]])
        >>> pair_saturated_matmul(a, torch.tensor([[127], [127]])).item()  # 64770 saturates
        32767
        >>> pair_saturated_matmul(a, torch.tensor([[64], [63]])).item()    # 7-bit: exact
        32385
    """
    a, w = a.to(torch.int32), w.to(torch.int32)  # |pair| <= 2 * 255 * 128: int32 holds it
    if a.shape[1] % 2:
        a, w = nn.functional.pad(a, (0, 1)), nn.functional.pad(w, (0, 0, 0, 1))
    out = []
    for rows in a.split(chunk):
        pairs = rows[:, 0::2, None] * w[None, 0::2] + rows[:, 1::2, None] * w[None, 1::2]
        out.append(pairs.clamp(INT16_MIN, INT16_MAX).sum(1, dtype=torch.int64))  # (m, N)
    return torch.cat(out) if out else torch.zeros(0, w.shape[1], dtype=torch.int64)


def runs_on_u8s8(layer: nn.Module) -> bool:
    """Whether ONNX Runtime runs `layer` on its u8s8 kernels (MatMulIntegerToFloat): a Linear
    with a static per-tensor uint8 input and a symmetric per-tensor/per-channel 8-bit weight."""
    if not isinstance(layer, IntLinear) or layer.weight_spec is None or layer.input_spec is None:
        return False
    ws, xs = layer.weight_spec, layer.input_spec
    return (
        ws.symmetric and ws.bits > 4 and ws.granularity != "per_group"
        and not xs.symmetric and not xs.dynamic and xs.bits == 8
    )  # fmt: skip


def _emulated_forward(layer: IntLinear, x: torch.Tensor) -> torch.Tensor:
    q, s_x, z_x = layer.quantize_act("input", x)
    lead = x.shape[:-1]
    w = layer.int_weight().T  # (K, N) int8 codes
    a = q.reshape(-1, x.shape[-1])  # uint8 codes, zero point included
    # The activation zero point is removed afterwards with exact column sums, as MLAS does.
    acc = pair_saturated_matmul(a, w) - z_x.to(torch.int64) * w.to(torch.int64).sum(0)
    scale = s_x.to(torch.float64) * layer.weight_scale.to(torch.float64)
    return layer.finish(acc.to(torch.float64), scale, channel_dim=-1).reshape(*lead, -1)


@contextlib.contextmanager
def emulate_no_vnni(int_model: nn.Module) -> Iterator[int]:
    """Within the block, every u8s8 Linear of `int_model` saturates pair sums like a CPU
    without VNNI; yields how many layers are affected."""
    layers = [m for m in int_model.modules() if runs_on_u8s8(m)]
    for m in layers:
        m._integer_forward = _emulated_forward.__get__(m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m._integer_forward
