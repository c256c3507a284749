"""`nn.ConvTranspose2d` (decoders, U-Nets) through the shipped families: prepare -> training
steps -> convert -> parity gate -> save/load -> ONNX Runtime, and the recipe's axis checked."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.export import IntConvTranspose2d, parity_report
from qat.models.registry import register

from .helpers import assert_onnx_exact


@register("test_tiny_decoder")
def tiny_decoder() -> nn.Module:
    """Conv down, transposed conv up (stride 2, output padding 1, asymmetric crop)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 1, 1, bias=False),
    )  # fmt: skip


def recipe(axis: int) -> dict:
    return {"rules": [
        {"match": {"types": ["Conv2d", "ConvTranspose2d"]},
         "weight": {"bits": 8, "granularity": "per_channel", "learn": "lsq"},
         "input": {"bits": 8, "symmetric": False, "observer": "ema"}},
        {"match": {"types": ["ConvTranspose2d"]}, "weight": {"axis": axis}},
    ]}  # fmt: skip


def test_per_channel_scales_must_lie_along_the_output_channels():
    with pytest.raises(ValueError, match=r"rules\[0\]\+rules\[1\]\.weight\.axis: got 0; allowed: "
                       r"1 \(output channels\) for ConvTranspose2d"):
        qat.plan(tiny_decoder(), recipe(axis=0))


def test_conv_transpose_quantizes_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = qat.prepare(qat.models.registry.build_model("test_tiny_decoder"), recipe(axis=1))
    assert qat.plan(tiny_decoder(), recipe(axis=1)).unquantizable == {}
    x = torch.rand(16, 1, 8, 8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(5):  # an autoencoder's reconstruction loss
        loss = F.mse_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scale = model[2].weight_quant.scale
    assert scale.shape == (4,) and scale.grad is not None  # one learned scale per out channel
    int_model = qat.convert(model.eval())
    assert type(int_model[2]) is IntConvTranspose2d
    parity_report(model, int_model, [x[:8], x[8:]]).check()
    loaded = qat.load(qat.save(int_model, tmp_path / "decoder"))
    assert torch.equal(loaded(x), int_model(x))

    assert_onnx_exact(loaded, [(x[:8],), (x[8:],)], tmp_path / "decoder.onnx")


def test_grouped_per_channel_scales_repeat_across_the_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2))
    model = qat.prepare(model, {"rules": [{"match": {"types": ["ConvTranspose2d"]},
        "weight": {"bits": 8, "granularity": "per_channel", "axis": 1},
        "input": {"bits": 8, "symmetric": False}}]})  # fmt: skip
    x = torch.randn(8, 4, 5, 5)
    model(x)  # calibrate
    assert model[0].weight_quant.scale.shape == (3,)  # out / groups channels per group
    int_model = qat.convert(model.eval())
    parity_report(model, int_model, [x]).check()
