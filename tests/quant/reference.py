"""An independent, written-out reference of the numerics contract in NumPy (float64 where exact).

Deliberately shares no code with `qat.quant`: loops over slices instead of views, NumPy's
`round` (half to even) instead of torch's.
"""

from __future__ import annotations

import numpy as np


def grid(bits: int, symmetric: bool, narrow: bool = False) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def slices(x: np.ndarray, granularity: str, axis: int = 0, group: int = 0) -> list[np.ndarray]:
    """Index arrays (boolean masks) of the elements that share one scale, in scale order."""
    idx = np.arange(x.size).reshape(x.shape)
    if granularity == "per_tensor":
        return [idx.ravel()]
    if granularity == "per_channel":
        return [np.take(idx, c, axis=axis).ravel() for c in range(x.shape[axis])]
    if granularity == "per_group":
        rows = idx.reshape(x.shape[0], -1)
        return [
            rows[r, g : g + group]
            for r in range(rows.shape[0])
            for g in range(0, rows.shape[1], group)
        ]
    rows = idx.reshape(-1, x.shape[-1])  # per_token
    return [rows[r] for r in range(rows.shape[0])]


def qparams(lo: float, hi: float, bits: int, symmetric: bool, narrow: bool = False):
    qmin, qmax = grid(bits, symmetric, narrow)
    lo, hi = min(np.float32(lo), np.float32(0)), max(np.float32(hi), np.float32(0))
    eps = np.finfo(np.float32).eps
    if symmetric:
        amax = max(-lo, hi)
        s = np.float32(amax) / np.float32((qmax - qmin) / 2)
        return np.float32(max(s, eps)), np.float32(0)
    s = np.float32(max(np.float32(hi - lo) / np.float32(qmax - qmin), eps))
    z = np.clip(qmin - np.round(np.float32(lo) / s), qmin, qmax)
    return s, np.float32(z)


def fake_quant(
    x: np.ndarray, granularity: str, bits: int, symmetric: bool, axis=0, group=0, narrow=False
):
    """Min/max-calibrated fake quant of `x` (float32) with per-slice scales."""
    x = x.astype(np.float32)
    flat = x.ravel()
    out = np.empty_like(flat)
    qmin, qmax = grid(bits, symmetric, narrow)
    for sl in slices(x, granularity, axis, group):
        v = flat[sl]
        s, z = qparams(v.min(), v.max(), bits, symmetric, narrow)
        q = np.clip(np.round(v / s) + z, qmin, qmax)
        out[sl] = ((q - z) * s).astype(np.float32)
    return out.reshape(x.shape)
