"""GPT-2's transformers `Conv1D` (weight stored (in, out)) through the shipped families:
prepare -> training steps -> convert -> parity gate -> save/load -> ONNX Runtime."""

import pytest
import torch
import torch.nn.functional as F

import qat
from qat.export import IntLinear, parity_report

from .helpers import assert_onnx_exact

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 16, "vocab_size": 32,
        "n_positions": 16, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip
RECIPE = {"rules": [{"match": {"types": ["transformers.pytorch_utils.Conv1D"]},
                     "weight": {"bits": 4, "granularity": "per_group", "group_size": 8,
                                "learn": "lsq"},
                     "input": {"bits": 8, "granularity": "per_token", "dynamic": True,
                               "symmetric": False}}]}  # fmt: skip


def test_gpt2_conv1d_layers_quantize_end_to_end(tmp_path):
    model = qat.models.registry.build_model("hf_causal_lm", config=GPT2, seed=0)
    n_conv1d = sum(isinstance(m, Conv1D) for m in model.modules())
    p = qat.plan(model, RECIPE)
    assert len(p.quantized()) == n_conv1d == 8 and p.unquantizable == {}
    model = qat.prepare(model, RECIPE)
    c_attn = model.model.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "QATConv1D" and isinstance(c_attn, Conv1D)
    # A scale per output feature and group of 8 inputs: the (out, in) view of the stored weight.
    assert c_attn.weight.shape == (16, 48) and c_attn.weight_quant.scale.shape == (48, 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (4, 12), generator=g)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(3):
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 32), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    int_model = qat.convert(model.eval())
    layer = int_model.model.transformer.h[0].attn.c_attn
    assert type(layer).__name__ == "IntConv1D" and isinstance(layer, IntLinear)
    batches = [torch.randint(0, 32, (2, 12), generator=g) for _ in range(2)]
    parity_report(model, int_model, batches).check()
    loaded = qat.load(qat.save(int_model, tmp_path / "gpt2"))
    assert type(loaded.model.transformer.h[1].mlp.c_fc).__name__ == "IntConv1D"
    assert torch.equal(loaded(batches[0]), int_model(batches[0]))

    # With a mask, as deployed: without one transformers traces a packed-sequence check
    # (aten::diff) that has no ONNX form.
    feeds = [(b, torch.ones_like(b)) for b in batches]
    assert_onnx_exact(loaded, feeds, tmp_path / "gpt2.onnx", ["input_ids", "attention_mask"])
