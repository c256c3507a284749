"""Hugging Face models from tiny configs (random weights, nothing downloaded)."""

from pathlib import Path

import pytest
import torch

import qat
from qat.quant import quantizers
from qat.quant.modules import QATLinear

transformers = pytest.importorskip("transformers")
RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipe"


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return transformers.BertModel(cfg)


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize(
    "builder,recipe",
    [
        (tiny_bert, RECIPES / "w8a8.yaml"),
        (tiny_bert, RECIPES / "w4a4_lsq.yaml"),
        (tiny_llama, RECIPES / "w4g32_a8dyn.yaml"),
        (tiny_llama, RECIPES / "w4a8.yaml"),
    ],
)
def test_hf_models_prepare_and_train(builder, recipe):
    torch.manual_seed(0)
    model = builder()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    p = qat.plan(model, recipe)
    planned = {lp.name for lp in p.quantized()}
    assert set(linears) <= planned
    qat.prepare(model, recipe)
    model.train()
    ids = torch.randint(0, 100, (2, 12))
    for _ in range(2):  # first pass calibrates, second trains with fake quant
        model.zero_grad()
        out = model(input_ids=ids)
        if hasattr(out, "logits"):
            t = out.logits
            loss = t.float().pow(2).mean()
        else:  # BERT: use the pooler too, so every Linear takes part
            t = out.last_hidden_state
            loss = t.pow(2).mean() + out.pooler_output.pow(2).mean()
        loss.backward()
    assert torch.isfinite(t).all()
    for name in linears:
        mod = model.get_submodule(name)
        assert isinstance(mod, QATLinear)
        assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0, name
    learned = [q for q in quantizers(model).values() if q.learned]
    if "lsq" in recipe.name or "w4" in recipe.name:
        assert learned and all(q.scale.grad is not None for q in learned)
