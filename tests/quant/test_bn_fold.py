import copy

import pytest
import torch

import qat
from qat.models.registry import build_model
from qat.quant import disable_fake_quant, disable_observer, freeze_bn_stats
from qat.quant.bn_fold import QATConvBn2d

W8 = {
    "rules": [
        {
            "match": {"types": ["Conv2d", "Linear"]},
            "weight": {"bits": 8, "granularity": "per_channel"},
            "input": {"bits": 8, "symmetric": False},
        }
    ]
}


def trained_cnn():
    torch.manual_seed(0)
    model = build_model("cnn")
    model.train()
    for _ in range(3):  # give BN non-trivial running statistics
        model(torch.randn(16, 1, 8, 8) * 2 + 0.5)
    return model


@pytest.mark.parametrize("bn", ["fold", "merge"])
def test_folded_forward_equals_float_conv_bn_in_eval(bn):
    ref = trained_cnn().eval()
    model = qat.prepare(copy.deepcopy(ref), {**W8, "bn": bn})
    model.apply(disable_fake_quant)
    model.eval()
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    n_fused = sum(isinstance(m, QATConvBn2d) for m in model.modules())
    assert n_fused == (6 if bn == "fold" else 0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) or bn == "fold"


def test_fold_trains_with_batch_statistics_until_frozen():
    ref = trained_cnn()
    model = qat.prepare(copy.deepcopy(ref), W8)
    model.apply(disable_fake_quant)
    ref.train(), model.train()
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
    # Running statistics were updated like the float BN's.
    torch.testing.assert_close(
        model.bn1.running_mean
        if hasattr(model.bn1, "running_mean")
        else model.conv1.bn.running_mean,
        ref.bn1.running_mean,
    )
    model.apply(freeze_bn_stats)
    before = model.conv1.bn.running_mean.clone()
    out_frozen = model(x)
    assert torch.equal(before, model.conv1.bn.running_mean)
    torch.testing.assert_close(out_frozen, ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_keep_leaves_batchnorm_float():
    model = qat.prepare(trained_cnn(), {**W8, "bn": "keep"})
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)
    assert type(model.conv1).__name__ == "QATConv2d"


def test_fold_quantizes_the_folded_weight():
    model = qat.prepare(trained_cnn(), W8)
    qat.quant.calibrate(model, [torch.randn(4, 1, 8, 8)], num_batches=1)
    model.eval()
    conv = model.conv1
    w = conv.folded_weight()
    fq = conv.quantized_weight()
    step = conv.weight_quant.scale[:, None, None, None]
    assert ((fq - w).abs() <= step / 2 + 1e-7).all()
    assert not torch.allclose(w, conv.weight)  # BN scale really is in the quantized weight


def test_untraceable_model_falls_back_to_sequential_pairs():
    class Dyn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4)
            )

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                return self.body(x)
            return self.body(-x)

    with pytest.warns(UserWarning, match="could not trace Dyn"):
        model = qat.prepare(
            Dyn(), W8 | {"rules": [{"match": {"types": ["Conv2d"]}, "weight": {"bits": 8}}]}
        )
    assert isinstance(model.body[0], QATConvBn2d)


def test_frozen_fold_computes_the_exported_conv_and_trains_like_scaling_back_through_bn():
    torch.manual_seed(0)
    model = qat.prepare(trained_cnn(), W8)
    qat.quant.calibrate(model, [torch.randn(4, 1, 8, 8)], num_batches=1)
    conv = model.blocks[1].conv1
    conv.apply(freeze_bn_stats)
    conv.apply(disable_observer)
    conv.train()
    x = torch.randn(4, conv.in_channels, 8, 8)
    y = conv(x)
    # Exactly the integer layer's computation: conv(q(x), fq(w_folded)) + the folded bias on
    # its int32 grid, round_half_even(b / fp32(s_x * s_w)) steps of s_x * s_w.
    s_b = (conv.input_quant.scale * conv.weight_quant.scale).double()
    b = (torch.round(conv.folded_bias().double() / s_b) * s_b).float()
    expect = conv._conv_forward(conv.input_quant(x), conv.quantized_weight(), b)
    assert torch.equal(y, expect)
    # Gradients equal those of the textbook form: scale the conv output back, BN in eval mode,
    # with the bias moved onto its grid straight-through.
    params = [conv.weight, conv.bn.weight, conv.bn.bias]
    grads = torch.autograd.grad(y.square().sum(), params)
    scale = conv.bn.weight / torch.sqrt(conv.bn.running_var + conv.bn.eps)
    raw = conv._conv_forward(conv.input_quant(x), conv.quantized_weight(), None)
    ref = torch.nn.functional.batch_norm(
        raw / scale[None, :, None, None], conv.bn.running_mean, conv.bn.running_var,
        conv.bn.weight, conv.bn.bias, training=False, eps=conv.bn.eps,
    ) + (b - conv.folded_bias()).detach()[None, :, None, None]
    torch.testing.assert_close(ref, y, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), params), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
