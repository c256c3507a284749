"""`nn.MultiheadAttention` (inside `nn.TransformerEncoderLayer`) through the shipped families:
prepare -> training steps -> convert -> parity gate -> save/load -> ONNX Runtime."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.export import IntLinear, parity_report
from qat.models.registry import register
from qat.quant.attention import QATMultiheadAttention

from .helpers import assert_onnx_exact


class TinyEncoder(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


@register("test_tiny_encoder")
def tiny_encoder() -> nn.Module:
    return TinyEncoder()


RECIPE = {"rules": [{"match": {"types": ["Linear", "MultiheadAttention"]},
                     "weight": {"bits": 8, "granularity": "per_channel", "learn": "lsq"},
                     "input": {"bits": 8, "symmetric": False, "observer": "ema"}}]}  # fmt: skip


def test_masks_and_options_compute_what_torch_computes():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
        ours = QATMultiheadAttention.from_float(mha).eval()
        x, y = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
        if not batch_first:
            x, y = x.transpose(0, 1), y.transpose(0, 1)
        pad = torch.zeros(2, 7, dtype=torch.bool)
        pad[0, -2:] = True
        calls = [((x, x, x), {}), ((x, y, y), {"key_padding_mask": pad}),
                 ((x, y, y), {"attn_mask": torch.ones(5, 7, dtype=torch.bool).triu(3),
                              "average_attn_weights": False})]  # fmt: skip
        for args, kw in calls:
            (a, wa), (b, wb) = mha(*args, **kw), ours(*args, **kw)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
            torch.testing.assert_close(wb, wa, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"add_bias_kv is not supported"):
        QATMultiheadAttention.from_float(nn.MultiheadAttention(8, 2, add_bias_kv=True))


def test_multihead_attention_quantizes_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = qat.models.registry.build_model("test_tiny_encoder")
    p = qat.plan(model, RECIPE)
    assert p.unquantizable == {}
    assert "layer.self_attn" in [lp.name for lp in p.quantized()]
    in_proj = model.layer.self_attn.in_proj_weight
    model = qat.prepare(model, RECIPE)
    attn = model.layer.self_attn
    assert type(attn) is QATMultiheadAttention and attn.in_proj.weight is in_proj  # shared
    x, y = torch.randn(32, 6, 16), torch.randint(0, 3, (32,))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert attn.in_proj.weight_quant.scale.grad is not None
    int_model = qat.convert(model.eval())
    assert isinstance(int_model.layer.self_attn.in_proj, IntLinear)
    assert isinstance(int_model.layer.self_attn.out_proj, IntLinear)
    parity_report(model, int_model, [x[:16], x[16:]]).check()
    loaded = qat.load(qat.save(int_model, tmp_path / "encoder"))
    assert type(loaded.layer.self_attn) is QATMultiheadAttention
    assert torch.equal(loaded(x), int_model(x))

    assert_onnx_exact(loaded, [(x[:16],), (x[16:],)], tmp_path / "encoder.onnx")


def test_a_nested_tensor_encoder_is_refused_by_name():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                           batch_first=True), 1)  # fmt: skip
    qat.prepare(enc, {"rules": [{"match": {"types": ["MultiheadAttention"]},
                                 "weight": {"bits": 8}}]})  # fmt: skip
    x, pad = torch.randn(2, 6, 16), torch.zeros(2, 6, dtype=torch.bool)
    pad[0, -2:] = True
    qat.quant.calibrate(enc, [x], 1)
    with torch.no_grad(), pytest.raises(ValueError, match="enable_nested_tensor=False"):
        enc.eval()(x, src_key_padding_mask=pad)  # eval + padding mask: torch's nested path
