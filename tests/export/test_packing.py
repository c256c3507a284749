"""Code storage (int4 nibbles) and the exactness of the float64 integer accumulation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.export import pack_int4, unpack_int4
from qat.export.integer import grouped_matmul, integer_matmul


def test_nibble_order_is_low_then_high_with_twos_complement():
    packed = pack_int4(torch.tensor([[1, -2, 7], [-8, 0, 3]]))
    # 1 | (0xE << 4) = 0xE1; 7 then the zero pad nibble; -8 = 0x8 low, 0 high; 3
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0xE1, 0x07], [0x08, 0x03]]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 33),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int4_pack_unpack_round_trip(rows, cols, signed, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = torch.randint(lo, hi + 1, (rows, cols), generator=g)
    packed = pack_int4(codes)
    assert packed.shape == (rows, (cols + 1) // 2)
    assert torch.equal(unpack_int4(packed, cols, signed).long(), codes)


def test_pack_rejects_codes_outside_four_bits():
    with pytest.raises(ValueError, match=r"must lie in \[-8, 15\]"):
        pack_int4(torch.tensor([16]))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.tensor([1], dtype=torch.int8), 2, signed=True)


@pytest.mark.parametrize("group_size", [None, 64])
def test_float64_accumulation_is_exact_against_int64_on_large_k(group_size):
    k = 32768  # the largest K whose worst case (-128 * -128 per term) still fits int32
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (4, k), generator=g)
    w = torch.randint(-128, 128, (6, k), generator=g)
    x[0], w[0] = -128, -128  # worst case: 2^14 * 2^15 = 2^29 per output
    x[1], w[1] = 127, -128
    ref = x @ w.T  # int64
    assert ref.abs().max() < 2**31  # the contract's int32 accumulator holds it
    if group_size is None:
        acc = integer_matmul(x.double(), w.double())
    else:  # unit scales: the sum of the exact per-group products, in chunks of groups
        one = torch.ones((), dtype=torch.float64)
        acc = grouped_matmul(x.double(), w.double(), group_size, one, one, max_bytes=4 * 4 * 6 * 8)
    assert torch.equal(acc.long(), ref)
    assert ref[0, 0] == 2**29
