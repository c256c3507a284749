"""The bias grid: a layer with a static per-tensor input adds its bias as int32 codes in steps
of `s_x * s_w`, as integer kernels (QLinearConv) do; checked against the written-out formula."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.quant import QuantSpec, disable_observer
from qat.quant.modules import QATConv2d, QATLinear

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False)


def _calibrated(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    layer(x)  # observes and sets the scales
    layer.apply(disable_observer)
    return layer


def _formula(b: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """round_half_even(b / fp32(s_x * s_w)) * (s_x * s_w), in float64, then fp32."""
    step = (s_x.float() * s_w.float()).double()
    return (torch.round(b.double() / step) * step).float()


def test_linear_adds_its_bias_on_the_int32_grid_with_a_straight_through_gradient():
    torch.manual_seed(0)
    lin = QATLinear.from_float(nn.Linear(16, 4), weight=W8, input=A8, name="fc")
    lin.bias.data = torch.randn(4) * 3  # far from the grid: the rounding is visible
    x = torch.randn(8, 16)
    _calibrated(lin, x)
    s_x, s_w = lin.input_quant.scale, lin.weight_quant.scale
    b = _formula(lin.bias, s_x, s_w)
    assert not torch.equal(b, lin.bias)
    y = lin(x)
    assert torch.equal(y, F.linear(lin.input_quant(x), lin.quantized_weight(), b))
    (grad,) = torch.autograd.grad(y.sum(), [lin.bias])
    assert torch.equal(grad, torch.full((4,), 8.0))  # d(sum)/db of 8 rows: straight through


def test_conv_bias_grid_matches_the_formula():
    torch.manual_seed(1)
    conv = QATConv2d.from_float(nn.Conv2d(3, 5, 3), weight=W8, input=A8, name="c")
    x = torch.randn(2, 3, 6, 6)
    _calibrated(conv, x)
    b = _formula(conv.bias, conv.input_quant.scale, conv.weight_quant.scale)
    want = F.conv2d(conv.input_quant(x), conv.quantized_weight(), b)
    assert torch.equal(conv(x), want)


@pytest.mark.parametrize("weight,input", [
    (QuantSpec(bits=4, granularity="per_group", group_size=8), A8),  # one scale per group
    (W8, QuantSpec(bits=8, granularity="per_token", dynamic=True)),  # scales per call
    (W8, None),  # weight-only
])  # fmt: skip
def test_float_bias_where_no_single_step_exists(weight, input):  # noqa: A002
    torch.manual_seed(2)
    lin = QATLinear.from_float(nn.Linear(16, 4), weight=weight, input=input, name="fc")
    x = torch.randn(8, 16)
    _calibrated(lin, x)
    xq = x if lin.input_quant is None else lin.input_quant(x)
    assert torch.equal(lin(x), F.linear(xq, lin.quantized_weight(), lin.bias))


def test_calibration_passes_the_float_bias():
    lin = QATLinear.from_float(nn.Linear(4, 2), weight=W8, input=A8, name="fc")
    lin.input_quant.fake_quant_enabled.fill_(False)
    assert lin.bias_scale(lin.bias) is None
