"""Integer code storage: int8/uint8 for 5..8 bits; 2..4-bit codes packed densely along each
row (`pack_bits`: 4, 8/3 or 2 codes per byte).

At 4 bits the stream is the ONNX INT4/UINT4 nibble order: along the last dimension, element
`2i` goes in the low nibble of byte `i` and element `2i+1` in the high nibble; an odd length
is padded with a zero nibble. Signed codes are stored in two's complement (`q & 0xF` at 4
bits) and sign-extended on unpacking, unsigned codes as they are.
"""

from __future__ import annotations

import math

import torch

from qat.quant import grid
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


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer-valued codes of `bits` (2..4) bits into uint8 along the last dim, as a
    bit stream: code `i` takes bits `i*bits .. i*bits+bits-1` (least significant first) of
    its row, each row padded to whole bytes. At 4 bits this is `pack_int4`'s nibble order;
    2 bits put four codes in a byte, 3 bits eight codes in three bytes.

    Example:
        >>> pack_bits(torch.tensor([1, -2, 3]), 3).tolist()  # 001, 110, 011
        [241, 0]
        >>> unpack_bits(pack_bits(torch.tensor([1, -2, 3]), 3), 3, 3, signed=True).tolist()
        [1, -2, 3]
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"pack_bits: bits must be 2, 3 or 4, got {bits}")
    c = codes.to(torch.int16)
    lo, hi = -(1 << (bits - 1)), (1 << bits) - 1
    if c.numel() and (c.min() < lo or c.max() > hi):
        raise ValueError(f"pack_bits: {bits}-bit codes must lie in [{lo}, {hi}], got "
                         f"[{c.min().item()}, {c.max().item()}]")  # fmt: skip
    n = c.shape[-1]
    planes = (c[..., None] >> torch.arange(bits)) & 1  # (..., n, bits): two's complement
    stream = planes.flatten(-2)
    stream = torch.nn.functional.pad(stream, (0, -(n * bits) % 8))
    weights = 1 << torch.arange(8, dtype=torch.int16)
    return (stream.unflatten(-1, (-1, 8)) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, length: int, bits: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack_bits`: int16 codes of last dim `length` (sign-extended if `signed`)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits: expected a uint8 tensor, got {packed.dtype}")
    stream = (packed.to(torch.int16)[..., None] >> torch.arange(8)) & 1  # (..., bytes, 8)
    planes = stream.flatten(-2)[..., : length * bits].unflatten(-1, (length, bits))
    out = (planes << torch.arange(bits, dtype=torch.int16)).sum(-1).to(torch.int16)
    return torch.where(out >= 1 << (bits - 1), out - (1 << bits), out) if signed else out


def is_packed(spec: QuantSpec) -> bool:
    return spec.bits <= 4


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """Storage dtype of unpacked codes: int8 for signed grids, uint8 for unsigned ones."""
    return torch.int8 if spec.symmetric else torch.uint8


def _cols(shape: tuple[int, ...]) -> int:
    cols = 1
    for s in shape[1:]:
        cols *= s
    return cols


def stored_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the stored codes of a weight of `shape`: packed rows of
    `ceil(cols * bits / 8)` bytes at 2..4 bits."""
    if not is_packed(spec):
        return tuple(shape)
    return (shape[0], (_cols(shape) * spec.bits + 7) // 8)


def encode(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer-valued float codes (the output of `grid.quantize`) -> stored codes."""
    if is_packed(spec):
        return pack_bits(codes.reshape(codes.shape[0], -1), spec.bits)
    return codes.to(code_dtype(spec))


def unpack_rows(stored: torch.Tensor, spec: QuantSpec, length: int) -> torch.Tensor:
    """Packed rows (possibly gathered, e.g. embedding rows) -> int16 codes of `length`."""
    return unpack_bits(stored, length, spec.bits, spec.symmetric)


def decode(stored: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored codes -> int16 codes of `shape` (rows of packed codes may be gathered first)."""
    if is_packed(spec):
        return unpack_rows(stored, spec, _cols(shape)).reshape(shape)
    return stored.to(torch.int16).reshape(shape)


def weight_bytes(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """Bytes an artifact stores for a weight of `shape` under `spec`: its codes, its scales
    (fp16 or fp32) and, on an asymmetric grid, its uint8 zero points.

    Example:
        >>> weight_bytes(QuantSpec(bits=4, granularity="per_group", group_size=32,
        ...                        scale_dtype="fp16"), (8, 64))  # 8*64/2 + 16 scales * 2
        288
    """
    rows, *rest = stored_shape(spec, shape)
    codes = rows * math.prod(rest)
    scales = math.prod(grid.param_shape(spec, tuple(shape)))
    scale_size = 2 if spec.scale_dtype == "fp16" else 4
    return codes + scales * (scale_size + (0 if spec.symmetric else 1))
