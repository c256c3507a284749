"""Integer layers against independent references (NumPy codes, int64 accumulation)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qat.export import IntConv2d, IntLinear
from qat.quant.spec import QuantSpec

from ..quant import reference as ref


def _np_params(a: np.ndarray, spec: QuantSpec):
    """Per-slice min/max qparams (reference formulas), in the layer's scale layout."""
    sl = ref.slices(a, spec.granularity, spec.axis, spec.group_size or 0)
    flat = a.ravel()
    pairs = [ref.qparams(flat[i].min(), flat[i].max(), spec.bits, spec.symmetric) for i in sl]
    s = np.array([p[0] for p in pairs], np.float32)
    z = np.array([p[1] for p in pairs], np.float32)
    return s, z, sl


def _np_codes(a: np.ndarray, s, z, sl, spec: QuantSpec) -> np.ndarray:
    """Integer codes, per slice: clip(round_half_even(a / s) + z)."""
    flat, out = a.ravel(), np.empty(a.size, np.int64)
    for j, i in enumerate(sl):
        q = np.round(flat[i] / s[j]) + z[j]
        out[i] = np.clip(q, spec.qmin, spec.qmax)
    return out.reshape(a.shape)


def _torch_layout(v: np.ndarray, spec: QuantSpec, wshape) -> torch.Tensor:
    if spec.granularity == "per_tensor":
        return torch.tensor(v[0])
    if spec.granularity == "per_group":
        return torch.from_numpy(v).reshape(wshape[0], -1)
    return torch.from_numpy(v)


LINEAR_CASES = [
    ({"bits": 8, "granularity": "per_channel"}, {"bits": 8, "symmetric": False}),
    (
        {"bits": 4, "granularity": "per_group", "group_size": 16},
        {"bits": 8, "symmetric": False, "granularity": "per_token", "dynamic": True},
    ),
    ({"bits": 4, "granularity": "per_channel", "symmetric": False}, {"bits": 4}),
    (
        {"bits": 2, "narrow_range": True},
        {"bits": 8, "granularity": "per_token", "dynamic": True},
    ),
    (
        {"bits": 8, "granularity": "per_group", "group_size": 32, "symmetric": False},
        {"bits": 8, "symmetric": False},
    ),
]


@pytest.mark.parametrize("wd,xd", LINEAR_CASES)
def test_int_linear_matches_int64_reference(wd, xd):
    ws, xs = QuantSpec(**wd), QuantSpec(**xd)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    x = (rng.standard_normal((3, 5, 64)) * 2 + 0.3).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    s_w, z_w, sl_w = _np_params(w, ws)
    lin = IntLinear(64, 6, True, weight_spec=ws, input_spec=xs)
    lin.set_weight(
        torch.from_numpy(w), _torch_layout(s_w, ws, w.shape), _torch_layout(z_w, ws, w.shape)
    )
    if xs.dynamic:  # per call, from the data itself
        x2 = x.reshape(-1, 64)
        s_x, z_x, sl_x = _np_params(x2, xs)
    else:  # a calibrated static range wider than this batch, so some codes clamp
        s, z = ref.qparams(-1.5, 2.5, xs.bits, xs.symmetric)
        lin.set_act_qparams("input", torch.tensor(s), torch.tensor(z))
        x2 = x.reshape(-1, 64)
        s_x, z_x, sl_x = np.array([s]), np.array([z]), [np.arange(x2.size)]
    lin.set_bias(torch.from_numpy(b))  # after the input scale: its grid is s_x * s_w
    qx = _np_codes(x2, s_x, z_x, sl_x, xs)
    qw = _np_codes(w, s_w, z_w, sl_w, ws)
    zx = np.broadcast_to(z_x[:, None] if xs.dynamic else z_x[0], x2.shape).astype(np.int64)
    xc = torch.from_numpy(qx - zx)  # (M, K) int64
    g = ws.group_size or 64
    zw = _torch_layout(z_w, ws, w.shape).long()
    sw = _torch_layout(s_w, ws, w.shape).double()
    if ws.granularity != "per_group":
        zw, sw = zw.reshape(-1, 1), sw.reshape(-1, 1)  # (N or 1, 1): one per group of K
    wc = (torch.from_numpy(qw).reshape(6, -1, g) - zw[..., None]).reshape(6, 64)
    expected = torch.zeros(x2.shape[0], 6, dtype=torch.float64)
    for j, i in enumerate(range(0, 64, g)):
        acc = xc[:, i : i + g] @ wc[:, i : i + g].T  # exact int64
        expected += acc.double() * sw[:, min(j, sw.shape[1] - 1)]
    sx = torch.from_numpy(s_x).double().reshape(-1, 1)
    bias = torch.from_numpy(b).double()
    if lin.bias_grid:  # int32 codes round_half_even(b / fp32(s_x * s_w)), in the accumulator
        s_b = (np.float32(s_x[0]) * s_w.astype(np.float32)).astype(np.float64)
        bq = torch.from_numpy(np.round(b.astype(np.float64) / s_b))
        assert torch.equal(lin.bias, bq.int())
        bias = bq * torch.from_numpy(s_b)
    expected = (expected * sx + bias).float().reshape(3, 5, 6)
    torch.testing.assert_close(lin(torch.from_numpy(x)), expected, rtol=2**-23, atol=0)


def _unfold_conv_ref(xc, wc, s_x, s_w, b, group, b_codes=None, **kw):
    """int64 im2col convolution of centered codes, per weight group (a second, loop-free path);
    int32 bias codes `b_codes` join the int64 accumulator (no groups), a float bias `b` the
    result."""
    cols = F.unfold(xc.double(), wc.shape[2:], **kw).long()  # (B, C*kh*kw, L)
    w2 = wc.reshape(wc.shape[0], -1).long()  # (O, C*kh*kw)
    out = torch.zeros(cols.shape[0], w2.shape[0], cols.shape[2], dtype=torch.float64)
    k = w2.shape[1]
    g = group or k
    if b_codes is not None:
        acc = torch.einsum("ok,bkl->bol", w2, cols) + b_codes.long()[None, :, None]
        return (acc.double() * (s_x * s_w.double())[None, :, None]).float()
    for j, i in enumerate(range(0, k, g)):
        acc = torch.einsum("ok,bkl->bol", w2[:, i : i + g], cols[:, i : i + g])  # int64
        sw = s_w[:, j] if group else s_w
        out += acc.double() * sw.double()[None, :, None]
    return (out * s_x + b.double()[None, :, None]).float()


@pytest.mark.parametrize("group", [None, 9])
def test_int_conv2d_matches_int64_im2col_reference(group):
    torch.manual_seed(0)
    gran = {"granularity": "per_group", "group_size": group} if group else {}
    ws = QuantSpec(bits=4, **(gran or {"granularity": "per_channel"}))
    xs = QuantSpec(bits=8, symmetric=False)
    conv = IntConv2d(3, 5, [3, 3], [2, 2], [1, 1], [1, 1], weight_spec=ws, input_spec=xs)
    w = torch.randn(5, 3, 3, 3)
    view = w.reshape(5, -1, group) if group else w.reshape(5, -1)
    amax = view.abs().amax(-1)
    s_w = amax / 7.5
    conv.set_weight(w, s_w, torch.zeros_like(s_w))
    s_x, z_x = torch.tensor(0.02), torch.tensor(100.0)
    conv.set_act_qparams("input", s_x, z_x)
    b = torch.randn(5)
    conv.set_bias(b)
    b_codes = None
    if conv.bias_grid:  # int32 codes at fp32(s_x * s_w), added to the accumulator
        b_codes = torch.round(b.double() / (s_x * s_w).double())
        assert torch.equal(conv.bias, b_codes.int())
    x = torch.randn(2, 3, 7, 7)
    qx = torch.clamp(torch.round(x / s_x) + z_x, 0, 255)
    qw = conv.int_weight().long()
    expected = _unfold_conv_ref(
        (qx - z_x).long(), qw, s_x.double(), s_w, b, group, b_codes, padding=1, stride=2
    )
    y = conv(x)
    assert y.shape == (2, 5, 4, 4)
    torch.testing.assert_close(y.flatten(2), expected, rtol=2**-23, atol=0)


def test_int_conv2d_grouped_reflect_padding_matches_float64_dequantized_conv():
    torch.manual_seed(1)
    ws = QuantSpec(bits=8, granularity="per_group", group_size=6)
    xs = QuantSpec(bits=8)
    conv = IntConv2d(
        4, 6, [3, 3], [1, 1], [1, 1], [1, 1], groups=2, padding_mode="reflect",
        weight_spec=ws, input_spec=xs,
    )  # fmt: skip
    w = torch.randn(6, 2, 3, 3)
    s_w = w.reshape(6, -1, 6).abs().amax(-1) / 127.5
    conv.set_weight(w, s_w, torch.zeros_like(s_w))
    conv.set_act_qparams("input", torch.tensor(0.03), torch.tensor(0.0))
    conv.set_bias(torch.randn(6))  # grouped weights: a float bias
    x = torch.randn(2, 4, 6, 6)
    xq = torch.clamp(torch.round(x / 0.03), -128, 127).double() * 0.03
    wq = conv.dequantized_weight().double()
    ref_conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect").double()
    with torch.no_grad():
        ref_conv.weight.copy_(wq)
        ref_conv.bias.copy_(conv.bias.double())
        expected = ref_conv(xq).float()
    torch.testing.assert_close(conv(x), expected, rtol=1e-6, atol=1e-6)


def test_storage_dtypes_and_shapes():
    lin4 = IntLinear(64, 4, weight_spec=QuantSpec(bits=4, granularity="per_group", group_size=32,
                                                  scale_dtype="fp16"))  # fmt: skip
    assert lin4.weight_codes.dtype == torch.uint8 and lin4.weight_codes.shape == (4, 32)
    assert lin4.weight_scale.dtype == torch.float16 and lin4.weight_scale.shape == (4, 2)
    assert not hasattr(lin4, "weight_zero_point")
    lin8 = IntLinear(8, 4, weight_spec=QuantSpec(bits=8, symmetric=False))
    assert lin8.weight_codes.dtype == torch.uint8 and lin8.weight_zero_point.dtype == torch.uint8
    lin6 = IntLinear(8, 4, weight_spec=QuantSpec(bits=6, granularity="per_channel"))
    assert lin6.weight_codes.dtype == torch.int8 and lin6.weight_codes.shape == (4, 8)


def test_integer_path_refuses_scales_that_vary_inside_a_dot_product():
    with pytest.raises(ValueError, match=r"axis: got 1; allowed: 0 \(output channels\)"):
        IntLinear(8, 4, weight_spec=QuantSpec(granularity="per_channel", axis=1),
                  input_spec=QuantSpec())  # fmt: skip
    with pytest.raises(ValueError, match=r"granularity: got 'per_token'; allowed: per_tensor for "
                       r"IntConv2d \(its input scales must be constant inside each dot"):
        IntConv2d(2, 2, [1, 1], [1, 1], [0, 0], [1, 1], weight_spec=QuantSpec(),
                  input_spec=QuantSpec(granularity="per_token", dynamic=True))  # fmt: skip
