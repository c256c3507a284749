"""Property tests of the contract (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.quant import FakeQuantizer, QuantSpec, fake_quantize
from qat.quant import grid as qgrid

specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["per_tensor", "per_channel"]),
)
tensors = st.lists(
    st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32), min_size=2, max_size=64
).map(
    lambda v: (
        torch.tensor(v, dtype=torch.float32).reshape(2, -1)
        if len(v) % 2 == 0
        else torch.tensor(v[:-1], dtype=torch.float32).reshape(2, -1)
    )
)


def calibrated(spec, x):
    fq = FakeQuantizer(spec, role="weight", shape=x.shape)
    fq.observe(x)
    s, z = fq.qparams()
    return s, z


@settings(max_examples=150, deadline=None)
@given(spec=specs, x=tensors)
def test_idempotent_on_grid_and_error_bounded(spec, x):
    s, z = calibrated(spec, x)
    zp = None if spec.symmetric else z
    y = fake_quantize(x, s, zp, spec)
    # Idempotence: fake quant of a fake-quantized tensor changes nothing.
    assert torch.equal(fake_quantize(y, s, zp, spec), y)
    # Outputs lie on the grid: integer codes within [qmin, qmax].
    q = qgrid.quantize(y, s, z, spec)
    assert torch.equal(qgrid.dequantize(q, s, z, spec), y)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    # Zero maps to zero exactly.
    assert torch.equal(fake_quantize(torch.zeros_like(x), s, zp, spec), torch.zeros_like(x))
    # Inside the representable range, error is at most half a step (+ fp32 rounding).
    sv = qgrid.to_view(torch.ones_like(x), spec) * s[..., None]
    sb = qgrid.from_view(sv, spec, x.shape)
    lo = qgrid.from_view(
        qgrid.to_view(torch.ones_like(x), spec) * ((spec.qmin - z) * s)[..., None], spec, x.shape
    )
    hi = qgrid.from_view(
        qgrid.to_view(torch.ones_like(x), spec) * ((spec.qmax - z) * s)[..., None], spec, x.shape
    )
    inside = (x >= lo) & (x <= hi)
    err = (y - x).abs()
    assert (err[inside] <= sb[inside] * 0.5 * (1 + 1e-5) + 1e-6 * x.abs()[inside]).all()


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), scale=st.floats(1e-3, 10.0))
def test_ste_gradient_is_one_inside_including_boundaries_and_zero_outside(bits, symmetric, scale):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    s = torch.tensor(scale, dtype=torch.float32)
    z = torch.tensor(0.0 if symmetric else float(2 ** (bits - 1)))
    qmin, qmax = spec.qrange
    codes = torch.tensor(
        [qmin - 3, qmin - 1, qmin, qmin + 1, qmax - 1, qmax, qmax + 1, qmax + 4],
        dtype=torch.float32,
    )
    x = ((codes - z) * s).requires_grad_(True)  # exactly on (or beyond) the grid
    fake_quantize(x, s, None if symmetric else z, spec).sum().backward()
    want = ((codes >= qmin) & (codes <= qmax)).float()
    assert torch.equal(x.grad, want)
