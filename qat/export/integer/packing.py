"""Integer code storage: int8/uint8 for 5..8 bits, two 4-bit codes per byte for 2..4 bits.

Nibble order (the ONNX INT4/UINT4 convention): along the last dimension, element `2i` goes in
the low nibble of byte `i` and element `2i+1` in the high nibble; an odd length is padded with
a zero nibble. Signed codes are stored in two's complement (`q & 0xF`) and sign-extended on
unpacking, unsigned codes as they are.
"""

from __future__ import annotations

import torch

from qat.quant.spec import QuantSpec


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer-valued codes in `[-8, 15]` into uint8, two per byte along the last dim.

    Example:
        >>> pack_int4(torch.tensor([1, -2, 3])).tolist()
        [225, 3]
        >>> unpack_int4(pack_int4(torch.tensor([1, -2, 3])), 3, signed=True).tolist()
        [1, -2, 3]
    """
    c = codes.to(torch.int16)
    if c.numel() and (c.min() < -8 or c.max() > 15):
        raise ValueError(
            f"pack_int4: codes must lie in [-8, 15], got [{c.min().item()}, {c.max().item()}]"
        )
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    nib = c & 0xF  # (..., 2n): two's complement nibbles
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, length: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack_int4`: int16 codes of last dim `length` (sign-extended if `signed`)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected a uint8 tensor, got {packed.dtype}")
    p = packed.to(torch.int16)
    out = torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)[..., :length]  # (..., length)
    return torch.where(out >= 8, out - 16, out) if signed else out


def is_packed(spec: QuantSpec) -> bool:
    return spec.bits <= 4


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """Storage dtype of unpacked codes: int8 for signed grids, uint8 for unsigned ones."""
    return torch.int8 if spec.symmetric else torch.uint8


def stored_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the stored codes of a weight of `shape`: packed as `(rows, ceil(cols / 2))`."""
    if not is_packed(spec):
        return tuple(shape)
    cols = 1
    for s in shape[1:]:
        cols *= s
    return (shape[0], (cols + 1) // 2)


def encode(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer-valued float codes (the output of `grid.quantize`) -> stored codes."""
    if is_packed(spec):
        return pack_int4(codes.reshape(codes.shape[0], -1))
    return codes.to(code_dtype(spec))


def decode(stored: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored codes -> int16 codes of `shape` (rows of packed codes may be gathered first)."""
    if is_packed(spec):
        cols = 1
        for s in shape[1:]:
            cols *= s
        return unpack_int4(stored, cols, spec.symmetric).reshape(shape)
    return stored.to(torch.int16).reshape(shape)
