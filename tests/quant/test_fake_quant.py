import math

import numpy as np
import pytest
import torch

from qat.quant import FakeQuantizer, QuantSpec, fake_quantize
from qat.quant import grid as qgrid

from . import reference as ref

CASES = [
    ("per_tensor", (7, 33), {}),
    ("per_channel", (6, 5, 3, 3), {"axis": 0}),
    ("per_channel", (4, 10), {"axis": 1}),
    ("per_group", (6, 64), {"group_size": 16}),
    ("per_group", (4, 8, 2, 2), {"group_size": 8}),
    ("per_token", (2, 5, 24), {"dynamic": True}),
]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,shape,extra", CASES)
def test_forward_bit_exact_against_written_out_reference(
    bits, symmetric, granularity, shape, extra
):
    gen = torch.Generator().manual_seed(bits * 10 + symmetric)
    x = torch.randn(shape, generator=gen) * 3 + (0.0 if symmetric else 1.0)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, **extra)
    role = "input" if granularity == "per_token" else "weight"
    fq = FakeQuantizer(spec, role=role, shape=shape)
    got = fq(x).numpy()
    want = ref.fake_quant(
        x.numpy(), granularity, bits, symmetric, extra.get("axis", 0), extra.get("group_size", 0)
    )
    np.testing.assert_array_equal(got, want)


def test_narrow_range_symmetric_grid_is_exact():
    x = torch.randn(5, 40)
    spec = QuantSpec(bits=8, granularity="per_channel", narrow_range=True)
    got = FakeQuantizer(spec, role="weight", shape=x.shape)(x).numpy()
    np.testing.assert_array_equal(
        got, ref.fake_quant(x.numpy(), "per_channel", 8, True, narrow=True)
    )
    # With narrow range the largest magnitude maps exactly onto +-127 steps.
    assert torch.allclose(x.abs().amax(1), torch.from_numpy(got).abs().amax(1))


def _tie_free(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Nudge values whose x / scale lies within 1e-3 of a .5 tie."""
    frac = (x / scale).remainder(1.0)
    near = (frac - 0.5).abs() < 1e-3
    return torch.where(near, x + 0.01 * scale, x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_torch_per_tensor_fake_quantize_away_from_ties(symmetric):
    spec = QuantSpec(bits=8, symmetric=symmetric)
    x = torch.randn(4096) * 2
    fq = FakeQuantizer(spec, role="input")
    fq.observe(x)
    s, z = fq.qparams()
    x = _tie_free(x, s)
    want = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), spec.qmin, spec.qmax)
    torch.testing.assert_close(
        fake_quantize(x, s, None if symmetric else z, spec), want, rtol=0, atol=0
    )


def test_matches_torch_per_channel_fake_quantize_away_from_ties():
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
    w = torch.randn(16, 32)
    fq = FakeQuantizer(spec, role="weight", shape=w.shape)
    fq.observe(w)
    s, z = fq.qparams()
    w = _tie_free(w, s[:, None])
    want = torch.fake_quantize_per_channel_affine(w, s, z.int(), 0, spec.qmin, spec.qmax)
    torch.testing.assert_close(fake_quantize(w, s, None, spec), want, rtol=0, atol=0)


def test_tie_difference_with_torch_is_division_versus_reciprocal():
    """torch multiplies by 1/scale; we divide (as ONNX QuantizeLinear does). Near exact .5 ties
    in x / s the two round to different codes: document that it happens, and that we divide."""
    scale = torch.tensor(0.25812828540802)
    x = (torch.arange(-127, 127, dtype=torch.float32) + 0.5) * scale
    spec = QuantSpec(bits=8)
    ours = fake_quantize(x, scale, None, spec)
    theirs = torch.fake_quantize_per_tensor_affine(x, float(scale), 0, -128, 127)
    differ = ours != theirs
    assert differ.any(), "no tie difference found: update the note in this test"
    assert (ours - theirs).abs().max() <= scale * 1.0001  # one step at most
    torch.testing.assert_close(
        ours, torch.round(x / scale).clamp(-128, 127) * scale, rtol=0, atol=0
    )


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_gradients_match_torch_learnable_fake_quant(granularity, symmetric):
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=granularity, learn="lsq")
    x = torch.randn(8, 64) * 1.5
    fq = FakeQuantizer(spec, role="weight", shape=x.shape)
    fq.observe(x)
    with torch.no_grad():
        fq.scale.mul_(0.7)  # force clipping so both outside branches are exercised
    s0 = fq.scale.detach().clone()
    x = _tie_free(x, s0 if granularity == "per_tensor" else s0[:, None]).requires_grad_(True)
    upstream = torch.randn(x.shape)
    (fq(x) * upstream).sum().backward()

    n = x.numel() if granularity == "per_tensor" else x.shape[1]
    factor = 1.0 / math.sqrt(n * spec.qmax)
    x2 = x.detach().clone().requires_grad_(True)
    s2 = s0.clone().requires_grad_(True)
    z2 = fq.zero_point.detach().clone()
    if granularity == "per_tensor":
        y2 = torch._fake_quantize_learnable_per_tensor_affine(
            x2, s2.reshape(1), z2.reshape(1), spec.qmin, spec.qmax, factor
        )
    else:
        y2 = torch._fake_quantize_learnable_per_channel_affine(
            x2, s2, z2, 0, spec.qmin, spec.qmax, factor
        )
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(fq.scale.grad.reshape(s2.grad.shape), s2.grad, rtol=1e-4, atol=1e-6)


def test_lsq_plus_zero_point_gradient_matches_torch():
    spec = QuantSpec(bits=4, symmetric=False, learn="lsq_plus")
    x = torch.randn(512) * 2 + 0.5
    fq = FakeQuantizer(spec, role="input")
    fq.observe(x)
    with torch.no_grad():
        fq.scale.mul_(0.6)
    x = _tie_free(x, fq.scale.detach())
    fq(x).sum().backward()
    s2 = fq.scale.detach().reshape(1).clone().requires_grad_(True)
    z2 = fq.zero_point.detach().reshape(1).clone().requires_grad_(True)
    factor = 1.0 / math.sqrt(x.numel() * spec.qmax)
    torch._fake_quantize_learnable_per_tensor_affine(x, s2, z2, 0, 15, factor).sum().backward()
    torch.testing.assert_close(fq.zero_point.grad.reshape(1), z2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fq.scale.grad.reshape(1), s2.grad, rtol=1e-4, atol=1e-6)


def test_pact_learns_clip_gradient_from_clipped_values_only():
    spec = QuantSpec(bits=4, symmetric=False, learn="pact")
    fq = FakeQuantizer(spec, role="input")
    x = torch.tensor([0.0, 0.5, 1.0, 3.0, 5.0])
    fq.observe(torch.tensor([0.0, 2.0]))  # clip = 2
    assert fq.clip.item() == pytest.approx(2.0)
    fq(x).sum().backward()
    # Two values beyond the clip, each contributes qmax / levels = 1: PACT's d/d alpha.
    assert fq.clip.grad.item() == pytest.approx(2.0)


def test_fp16_scales_are_the_stored_values():
    spec = QuantSpec(bits=4, granularity="per_group", group_size=32, scale_dtype="fp16")
    w = torch.randn(4, 64)
    fq = FakeQuantizer(spec, role="weight", shape=w.shape)
    fq(w)
    assert torch.equal(fq.scale, fq.scale.half().float())


def test_state_dict_round_trip_reproduces_outputs_exactly():
    torch.manual_seed(0)
    specs = [
        QuantSpec(bits=4, granularity="per_channel", learn="lsq"),
        QuantSpec(bits=8, symmetric=False, observer="ema"),
        QuantSpec(bits=3, symmetric=False, learn="lsq_plus", observer="percentile"),
        QuantSpec(bits=4, granularity="per_group", group_size=8, observer="mse"),
    ]
    for spec in specs:
        role = "input" if spec.granularity == "per_tensor" else "weight"
        a = FakeQuantizer(spec, role=role, shape=(6, 16))
        for _ in range(3):
            a(torch.randn(6, 16))
        a.observer_enabled.fill_(False)
        b = FakeQuantizer(spec, role=role, shape=(6, 16))
        b.load_state_dict(a.state_dict())
        x = torch.randn(6, 16)
        assert torch.equal(a(x), b(x)), spec.describe()
        assert bool(b.calibrated) and not bool(b.observer_enabled)


def test_uncalibrated_quantizer_with_observer_off_is_a_clear_error():
    fq = FakeQuantizer(QuantSpec(), role="input", name="blocks.0.fc.input_quant")
    fq.observer_enabled.fill_(False)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.fc\.input_quant.*never observed"):
        fq(torch.randn(3))


def test_calibration_mode_passes_input_through_and_records_range():
    fq = FakeQuantizer(QuantSpec(bits=2), role="input")
    fq.fake_quant_enabled.fill_(False)
    x = torch.randn(100)
    assert torch.equal(fq(x), x)
    assert bool(fq.calibrated)
    assert fq.observer.max_val.item() == x.max().item()


def test_repr_shows_the_spec():
    fq = FakeQuantizer(
        QuantSpec(bits=4, granularity="per_group", group_size=32, learn="lsq"),
        role="weight",
        shape=(8, 64),
    )
    assert "4b per_group(32) sym minmax lsq" in repr(fq)


def test_param_shapes():
    assert qgrid.param_shape(QuantSpec(granularity="per_group", group_size=4), (3, 8)) == (3, 2)
    assert qgrid.param_shape(QuantSpec(granularity="per_channel", axis=1), (3, 8)) == (8,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_zero_point_takes_the_same_values_and_dtype_as_per_row_zero_points(dtype):
    """The single-zero-point fast path (scalar clamp bounds) against the per-row tensor path:
    the same rows under one shared (scale, zero point) must give identical outputs and grads."""
    x = (torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    s, z = torch.tensor(0.05), torch.tensor(-7.0)
    outs = []
    for scale, zp, spec in (
        (s, z, QuantSpec(bits=4, symmetric=False)),
        (s.expand(4).clone(), z.expand(4).clone(),
         QuantSpec(bits=4, symmetric=False, granularity="per_channel", axis=0)),
    ):
        xi = x.clone().requires_grad_()
        scale = scale.clone().requires_grad_()
        y = fake_quantize(xi, scale.to(dtype), zp, spec, mode="lsq", grad_factor=1.0)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, scale.grad.sum()))
    (y1, gx1, gs1), (y2, gx2, gs2) = outs
    assert y1.dtype == y2.dtype and torch.equal(y1, y2)
    assert torch.equal(gx1, gx2)
    torch.testing.assert_close(gs1, gs2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learn,role,gran", [("lsq", "weight", "per_channel"),
                                             ("pact", "input", "per_tensor")])
def test_a_learned_scale_pushed_below_zero_keeps_quantizing_and_learning(learn, role, gran):
    """An optimizer step can carry a learned scale below zero (Adam's steps are ~lr whatever
    the gradient, an int8 weight scale is ~5e-3). It must act as its magnitude, not as eps with
    no gradient (which left channels of the digits CNN quantized to zero for good)."""
    spec = QuantSpec(bits=8, granularity=gran, learn=learn)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    fq = FakeQuantizer(spec, role=role, shape=(3, 16))
    fq.train()
    fq(x)  # calibrate
    param = fq.clip if learn == "pact" else fq.scale
    ref = fq(x).detach()
    i = 1 if param.dim() else ...
    with torch.no_grad():
        param[i] = -param[i]
    out = fq(x)
    assert torch.equal(out, ref)
    out.sub(x * 1.5).square().sum().backward()
    assert param.grad[i] != 0
