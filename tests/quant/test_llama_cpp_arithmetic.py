"""`arithmetic: llama_cpp`: activations quantized as llama.cpp's CPU kernels quantize them to
Q8_0 blocks (see `qat.quant.grid.dynamic_quantize`), in training and in the integer executor."""

import gguf
import numpy as np
import pytest
import torch

from qat.export import IntLinear
from qat.quant import FakeQuantizer, QuantSpec, grid

Q8_BLOCKS = {"bits": 8, "granularity": "per_group", "group_size": 32, "dynamic": True,
             "narrow_range": True, "scale_dtype": "fp16", "arithmetic": "llama_cpp"}  # fmt: skip
SPEC = QuantSpec(**Q8_BLOCKS)


def _avx2_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's AVX2 `quantize_row_q8_0`, written out: per block of 32, `id = 127 / amax`
    in fp32 (0 for an all-zero block), codes `rint(x * id)` (round to nearest even), scale
    `fp16(amax / 127)`."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    codes = np.rint(blocks * inv)
    return codes.reshape(x.shape), (amax / np.float32(127)).astype(np.float16).reshape(-1)


def _activations() -> torch.Tensor:
    x = torch.randn(4, 7, 96, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0, :32] = 0.0  # an all-zero block
    x[0, 1, :32] = 0.25
    x[0, 1, :8] = torch.tensor([127, 62.5, -62.5, 61.5, 0.5, -1.5, 2.5, 3])  # id 1: ties
    return x


def test_codes_and_scales_are_llama_cpps_avx2_kernel_bit_for_bit():
    x = _activations()
    q, s, z = grid.dynamic_quantize(x, SPEC)
    codes, scales = _avx2_q8_0(x.numpy())
    assert np.array_equal(q.numpy(), codes) and q.abs().max() <= 127
    assert np.array_equal(s.reshape(-1).numpy(), scales.astype(np.float32))
    assert s.shape == (4, 7, 3) and not z.any()
    assert q[0, 0, :32].abs().sum() == 0 and s[0, 0, 0] == 0
    assert q[0, 1, :8].tolist() == [127, 62, -62, 62, 0, -2, 2, 3]  # half to even


def _division_ties(n: int = 64) -> torch.Tensor:
    """Blocks whose `x * (127 / amax)` is exactly a half-integer in fp32, for amax values whose
    `127 / amax` differs by an ulp from `127 * (1 / amax)` (torch's `scalar / tensor`): a
    reciprocal instead of llama.cpp's division rounds these to the other neighbour."""
    rng, blocks = np.random.default_rng(0), []
    while len(blocks) < n:
        amax = np.float32(rng.uniform(0.5, 8.0))
        inv = np.float32(127) / amax
        if inv == np.float32(127) * (np.float32(1) / amax):
            continue
        block = np.zeros(32, np.float32)
        block[0] = amax
        for j, k in enumerate(rng.integers(-120, 120, 31), 1):
            x = np.float32((k + 0.5) / inv)
            block[j] = x if np.float32(x * inv) == np.float32(k + 0.5) else 0.0
        blocks.append(block)
    return torch.from_numpy(np.stack(blocks))


def test_codes_at_division_ties_are_llama_cpps():
    """Found on SmolLM2: codes from `qmax / amax` taken as a reciprocal flipped some 1 in 10^5
    activation codes against llama.cpp's, and 30 layers compounded them (top-1 93%)."""
    x = _division_ties()
    q, _, _ = grid.dynamic_quantize(x, SPEC)
    codes, _ = _avx2_q8_0(x.numpy())
    assert (x[:, 1:] != 0).sum() > 1000  # that many exact half-integers
    assert np.array_equal(q.numpy(), codes)


def test_scales_equal_ggufs_q8_0_quantizer_and_codes_differ_only_at_its_rounding():
    """gguf-py's Q8_0 is llama.cpp's scalar reference: it multiplies by `1 / d` and rounds half
    away from zero, where the AVX2 kernel multiplies by `127 / amax` and rounds half to even."""
    x = _activations()
    q, s, _ = grid.dynamic_quantize(x, SPEC)
    ref = gguf.quants.quantize(x.numpy().reshape(-1, 96), gguf.GGMLQuantizationType.Q8_0)
    ref = gguf.quants.dequantize(ref, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)
    ours = grid.dequantize(q, s, torch.zeros_like(s), SPEC).numpy()
    steps = np.abs(ours - ref) / np.repeat(s.numpy(), 32, axis=-1).clip(min=1e-30)
    assert steps.max() <= 1.0 + 1e-3 and (steps > 0.5).mean() < 0.02


def test_fake_quant_forward_is_the_codes_and_its_gradient_passes_straight_through():
    x = _activations().requires_grad_()
    y = FakeQuantizer(SPEC, role="input")(x)
    q, s, z = grid.dynamic_quantize(x.detach(), SPEC)
    assert torch.equal(y.detach(), grid.dequantize(q, s, z, SPEC))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_int_linear_sums_each_block_with_its_input_and_weight_scales():
    """Per-group input and weight scales, against an int64 reference of llama.cpp's dot
    product: `sum_b d_x[b] * d_w[b] * sum_{i in b} q_x[i] * q_w[i]`."""
    ws = QuantSpec(bits=4, granularity="per_group", group_size=32, scale_dtype="fp16")
    lin = IntLinear(96, 5, bias=True, weight_spec=ws, input_spec=SPEC)
    w = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    s_w = (w.reshape(5, 3, 32).abs().amax(-1) / 8).half().float()
    lin.set_weight(w, s_w, torch.zeros_like(s_w))
    lin.set_bias(torch.randn(5, generator=torch.Generator().manual_seed(2)))
    x = _activations()
    q, s_x, _ = grid.dynamic_quantize(x, SPEC)
    qx = q.long().reshape(-1, 3, 32)
    qw = lin.int_weight().long().reshape(5, 3, 32)
    isum = torch.einsum("mbk,nbk->mbn", qx, qw)  # exact int64, per block
    scales = s_x.double().reshape(-1, 3, 1) * s_w.double().T[None]
    want = ((isum.double() * scales).sum(1) + lin.bias.double()).float().reshape(4, 7, 5)
    torch.testing.assert_close(lin(x), want, rtol=2**-23, atol=0)


@pytest.mark.parametrize("field,value", [("dynamic", False), ("symmetric", False),
                                         ("narrow_range", False), ("scale_dtype", "fp32")])
def test_llama_cpp_arithmetic_refuses_what_llama_cpp_does_not_compute(field, value):
    bad = {**Q8_BLOCKS, field: value}
    if field == "dynamic":
        bad["granularity"], bad["group_size"] = "per_tensor", None
    if field == "symmetric":
        bad["narrow_range"] = False
    with pytest.raises(ValueError, match=rf"spec\.{field}: got {value!r}; allowed: .* with "
                       "arithmetic: llama_cpp"):  # fmt: skip
        QuantSpec(**bad)


def test_grouped_activations_must_be_dynamic_and_match_the_weights_groups():
    static = QuantSpec(bits=8, granularity="per_group", group_size=32)
    with pytest.raises(ValueError, match=r"dynamic: got False; allowed: true for per_group"):
        FakeQuantizer(static, role="input")
    ws = QuantSpec(bits=4, granularity="per_group", group_size=16)
    with pytest.raises(ValueError, match=r"group_size: got 32; allowed: 16, the weight's group"):
        IntLinear(96, 5, weight_spec=ws, input_spec=SPEC)
