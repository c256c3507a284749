"""CPU kernel families, the ONNX target a file is written for, and how each layer runs there.

ONNX Runtime runs a Linear with a static 8-bit input on its integer GEMM (MatMulIntegerToFloat,
MLAS). On x86 that GEMM comes in two families that differ for int8 weights:

- `vnni` (AVX512-VNNI or AVX-VNNI; also every non-x86 CPU): uint8 x int8 products are summed
  in int32 (`vpdpbusd`): exact.
- `avx2` (AVX2 or AVX-512 without VNNI): `vpmaddubsw` adds each pair of neighbouring products
  (k = 2j, 2j+1) into an int16 with saturation, so full-range int8 weights can be off
  (255 * 127 * 2 = 64770 > 32767); codes within [-64, 64] never are (255 * 128 = 32640).

uint8 x uint8 products go through another kernel (widened to int16, `vpmaddwd` into int32) that
is exact on both. So the file's `target` picks the weight encoding of integer-GEMM layers:

- `any` (default): symmetric weights stored as uint8 with zero point 128 (the codes + 128, the
  same numbers): u8u8 kernels, exact on every CPU;
- `vnni`: int8 weights (u8s8, the fastest kernels on VNNI CPUs); exact on `vnni` CPUs, and on
  `avx2` ones only where every weight code lies in [-64, 64];
- `avx2`: int8 weights that must lie in [-64, 64] (7-bit weights: `configs/recipe/w7a8.yaml`),
  refused otherwise: exact everywhere, and u8s8 is faster than u8u8 without VNNI.

`emulate(int_model, family, target)` makes the integer executor compute what that family's
kernels compute for that target, so a test on one CPU proves the other family too: the rest of
the graph is the same binary's float code on both.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from qat.export.integer import IntLinear
from qat.export.integer.conv import _IntConvNd
from qat.export.integer.layer import IntLayer

FAMILIES = ("vnni", "avx2")
TARGETS = ("any", "vnni", "avx2")
SAFE_CODE = 64  # 255 * (64 + 64) = 32640 <= 32767: a pair of u8 x s8 products fits int16
INT16_MIN, INT16_MAX = -32768, 32767
_NAMES = {
    "vnni": "int32 dot products (x86 with VNNI, or not x86): exact at 8 bits",
    "avx2": "x86 without VNNI: u8s8 kernels add product pairs in int16 and saturate",
}


def cpu_family(cpuinfo: str | None = None) -> str:
    """This machine's family (`vnni` or `avx2`), from /proc/cpuinfo's flags on x86.

    Example:
        >>> cpu_family("flags : fpu sse2 avx2 avx512f"), cpu_family("flags : avx2 avx_vnni")
        ('avx2', 'vnni')
    """
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
            return "vnni"  # no vpmaddubsw: ARM's dot products widen
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "avx2"  # cannot tell: assume the family that can saturate
    flags = set(cpuinfo.split())
    return "vnni" if flags & {"avx512_vnni", "avx_vnni"} else "avx2"


def describe(family: str) -> str:
    return f"{family} ({_NAMES[family]})"


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"export.onnx.target: got {target!r}; allowed: {', '.join(TARGETS)} "
                         "(any: exact on every CPU; vnni: int8 weights for VNNI CPUs; avx2: "
                         "int8 weights within [-64, 64], exact everywhere)")
    return target


def integer_gemm(layer: nn.Module) -> bool:
    """Whether ONNX Runtime may run `layer` on its integer GEMM: a Linear (MatMulInteger) or a
    Conv (QLinearConv, where a quantizer takes its output) whose input has a static
    per-tensor 8-bit grid and whose weight is per tensor or per channel (int4 groups and
    dynamic per-token inputs dequantize and run the float op)."""
    if not isinstance(layer, IntLinear | _IntConvNd):
        return False
    if layer.weight_spec is None or layer.input_spec is None:
        return False
    ws, xs = layer.weight_spec, layer.input_spec
    return ws.granularity != "per_group" and not xs.dynamic and xs.granularity == "per_tensor"


def shifted_weights(layer: nn.Module, target: str) -> bool:
    """Whether the file stores this layer's symmetric codes as uint8 + 128: target `any`,
    where a code lies outside [-64, 64] (int8 codes within it are exact on every CPU, and the
    u8s8 kernels are the fast ones)."""
    if target != "any" or not integer_gemm(layer) or not layer.weight_spec.symmetric:
        return False
    lo, hi = _span(layer)
    return lo < -SAFE_CODE or hi > SAFE_CODE


def u8s8(layer: nn.Module, target: str) -> bool:
    """Whether this layer runs on the u8s8 kernels (int8 weights) in a file for `target`."""
    return (integer_gemm(layer) and layer.weight_spec.symmetric
            and not shifted_weights(layer, target))  # fmt: skip


def _span(layer: IntLayer) -> tuple[int, int]:
    codes = layer.int_weight()
    return int(codes.min()), int(codes.max())


def inexact_layers(int_model: nn.Module, target: str, family: str) -> list[str]:
    """Layers whose integer GEMM `family` does not compute exactly in a file for `target`."""
    if family == "vnni":
        return []
    out = []
    for name, m in int_model.named_modules():
        if u8s8(m, target):
            lo, hi = _span(m)
            if lo < -SAFE_CODE or hi > SAFE_CODE:
                out.append(f"{name} (weight codes [{lo}, {hi}])")
    return out


def check_weights_for(int_model: nn.Module, target: str) -> None:
    """A file for `avx2` must be exact on that family: refuse weights outside [-64, 64]."""
    check_target(target)
    if target != "avx2":
        return
    bad = inexact_layers(int_model, target, "avx2")
    if bad:
        raise ValueError(
            f"export.onnx.target=avx2 needs int8 weight codes within [-{SAFE_CODE}, {SAFE_CODE}] "
            f"(CPUs without VNNI add product pairs in int16), but {bad[0]} is outside"
            f"{f' (and {len(bad) - 1} more layers)' if len(bad) > 1 else ''}: train with 7-bit "
            "weights (recipe=w7a8) or export with export.onnx.target=any (exact everywhere)"
        )


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


def _avx2_forward(layer: IntLinear, x: torch.Tensor) -> torch.Tensor:
    """The u8s8 GEMM without VNNI. Signed 8-bit activations arrive as uint8 (ONNX Runtime
    shifts them by 128, zero point included), so the products are always u8 x s8."""
    q, s_x, z_x = layer.quantize_act("input", x)
    if layer.input_spec.symmetric:
        q, z_x = q + 128, z_x + 128
    lead = x.shape[:-1]
    w = layer.int_weight().T  # (K, N) int8 codes
    a = q.reshape(-1, x.shape[-1])  # uint8 codes, zero point included
    # The activation zero point is removed afterwards with exact column sums, as MLAS does.
    acc = pair_saturated_matmul(a, w) - z_x.to(torch.int64) * w.to(torch.int64).sum(0)
    scale = s_x.to(torch.float64) * layer.weight_scale.to(torch.float64)
    return layer.finish(acc.to(torch.float64), scale, channel_dim=-1).reshape(*lead, -1)


@contextlib.contextmanager
def emulate(int_model: nn.Module, family: str, target: str = "any") -> Iterator[int]:
    """Within the block, `int_model`'s integer GEMMs compute what `family`'s kernels compute
    in a file for `target`; yields how many layers compute differently from the executor's
    exact arithmetic (only u8s8 layers on `avx2`).

    Example:
        >>> from qat.quant import QuantSpec
        >>> lin = IntLinear(2, 1, bias=False, weight_spec=QuantSpec(bits=8),
        ...                 input_spec=QuantSpec(bits=8, symmetric=False))
        >>> lin.weight_codes.fill_(127)
        tensor([[127, 127]], dtype=torch.int8)
        >>> with emulate(lin, "avx2", target="vnni") as n:
        ...     n, lin(torch.tensor([[255.0, 255.0]])).item()  # scales 1: 64770 saturates
        (1, 32767.0)
        >>> with emulate(lin, "avx2", target="any") as n:  # uint8 + 128 weights: exact
        ...     n, lin(torch.tensor([[255.0, 255.0]])).item()
        (0, 64770.0)
    """
    if family not in FAMILIES:
        raise ValueError(f"family: got {family!r}; allowed: {', '.join(FAMILIES)}")
    layers = [] if family == "vnni" else [m for m in int_model.modules() if u8s8(m, target)]
    if any(isinstance(m, _IntConvNd) for m in layers) and inexact_layers(int_model, target, family):
        raise NotImplementedError("emulate: QLinearConv's int16 pair sums (im2col order) are "
                                  "not emulated; such a file is refused for this family anyway")
    layers = [m for m in layers if isinstance(m, IntLinear)]  # convs in range are exact
    for m in layers:
        m._integer_forward = _avx2_forward.__get__(m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m._integer_forward
