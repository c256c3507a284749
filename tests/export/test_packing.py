"""Code storage (dense 2..4-bit rows, int4 nibbles) and exact float64 integer accumulation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.export import pack_int4, unpack_int4
from qat.export.integer import integer_matmul, scaled_matmul
from qat.export.integer.packing import pack_bits, stored_shape, unpack_bits
from qat.quant import QuantSpec


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


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 41),
    bits=st.sampled_from([2, 3, 4]),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dense_pack_round_trips_and_takes_bits_per_code(rows, cols, bits, signed, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = torch.randint(lo, hi + 1, (rows, cols), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.shape == (rows, -(-cols * bits // 8))
    assert stored_shape(QuantSpec(bits=bits, symmetric=signed), (rows, cols)) == packed.shape
    assert torch.equal(unpack_bits(packed, cols, bits, signed).long(), codes)
    if bits == 4:  # the nibble layout artifacts and ONNX INT4 use
        assert torch.equal(packed, pack_int4(codes))


def test_three_bit_codes_fill_bytes_least_significant_bit_first():
    # 0b101, 0b010, 0b111 -> stream 1,0,1, 0,1,0, 1,1 | 1 -> bytes 0b11010101, 0b00000001
    assert pack_bits(torch.tensor([5, 2, 7]), 3).tolist() == [0b11010101, 0b1]
    with pytest.raises(ValueError, match=r"3-bit codes must lie in \[-4, 7\]"):
        pack_bits(torch.tensor([8]), 3)


def test_pack_rejects_codes_outside_four_bits():
    with pytest.raises(ValueError, match=r"must lie in \[-8, 15\]"):
        pack_int4(torch.tensor([16]))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.tensor([1], dtype=torch.int8), 2, signed=True)


def test_float64_accumulation_is_exact_against_int64_on_large_k():
    k = 32768  # the largest K whose worst case (-128 * -128 per term) still fits int32
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (4, k), generator=g)
    w = torch.randint(-128, 128, (6, k), generator=g)
    x[0], w[0] = -128, -128  # worst case: 2^14 * 2^15 = 2^29 per output
    x[1], w[1] = 127, -128
    ref = x @ w.T  # int64
    assert ref.abs().max() < 2**31  # the contract's int32 accumulator holds it
    assert torch.equal(integer_matmul(x.double(), w.double()).long(), ref)
    one = torch.ones((1, 1), dtype=torch.float64)
    assert torch.equal(scaled_matmul(x.double(), w.double(), one, one).long(), ref)
    assert ref[0, 0] == 2**29


def test_scaled_matmul_is_each_groups_exact_product_times_its_scales_to_float64():
    """Folding group scales into the columns rounds each term once: against each group's exact
    int64 product times its fp32 scales, summed in exact rationals, within 1e-14 of the
    output's magnitude, and the fp32 outputs equal."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(0)
    m, n, k, group = 3, 4, 256, 32
    x = torch.randint(-127, 128, (m, k), generator=g)
    w = torch.randint(-8, 8, (n, k), generator=g)
    s_x = torch.rand(m, k // group, generator=g).half().float()  # fp16 scales, as llama.cpp's
    s_w = torch.rand(n, k // group, generator=g).half().float()
    got = scaled_matmul(x.double(), w.double(), s_x.double().repeat_interleave(group, -1),
                        s_w.double().repeat_interleave(group, -1))  # fmt: skip
    parts = (x.reshape(m, 1, -1, group) * w.reshape(1, n, -1, group)).sum(-1)  # (m, n, G) int64
    for i in range(m):
        for j in range(n):
            exact = sum(Fraction(int(parts[i, j, t])) * Fraction(float(s_x[i, t]))
                        * Fraction(float(s_w[j, t])) for t in range(k // group))  # fmt: skip
            assert abs(Fraction(float(got[i, j])) - exact) <= Fraction(1, 10**14) * abs(exact)
            assert float(got[i, j].float()) == float(torch.tensor(float(exact)).float())


@pytest.mark.parametrize("bits", [2, 3])
def test_a_low_bit_artifact_stores_bits_per_weight_and_loads_the_same_codes(bits, tmp_path):
    import qat
    from qat.models.registry import build_model

    torch.manual_seed(0)
    gpt = build_model("gpt", preset="tiny", vocab_size=67, block_size=16)
    recipe = {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": bits}}]}
    model = qat.prepare(gpt, recipe)
    qat.quant.calibrate(model, [torch.randint(0, 67, (2, 16))], num_batches=1)
    layer = model.blocks[0].mlp.up_proj
    int_model = qat.convert(model.eval())
    rows, cols = layer.weight.shape
    assert int_model.blocks[0].mlp.up_proj.weight_codes.shape == (rows, cols * bits // 8)
    loaded = qat.load(qat.save(int_model, tmp_path / "a"))
    want = layer.weight_quant(layer.weight)
    assert torch.equal(loaded.blocks[0].mlp.up_proj.dequantized_weight(), want)
