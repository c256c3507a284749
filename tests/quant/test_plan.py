"""`plan` shows what stays float: modules with weights that no fake-quant class covers."""

import pytest
from torch import nn

import qat


def test_the_plan_names_what_no_fake_quant_class_covers():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    gpt2 = GPT2LMHeadModel(cfg)
    recipe = {"rules": [{"match": {"types": ["Linear", "Embedding"]}, "weight": {"bits": 8}}]}
    p = qat.plan(gpt2, recipe)
    # transformers' Conv1D holds GPT-2's attention and MLP matrices as (in, out): float for now.
    assert p.unquantizable == {f"transformer.h.0.{n}": "Conv1D" for n in
                               ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert "not quantizable, stays float: 4 module(s) of type Conv1D" in p.summary()
    assert "transformer.h.0.attn.c_attn" in str(p)
    with pytest.warns(UserWarning, match=r"^not quantizable, stays float: 4 module\(s\)") as seen:
        qat.prepare(gpt2, recipe)
    assert len([w for w in seen if "not quantizable" in str(w.message)]) == 1


def test_a_rule_that_matches_only_float_modules_says_so():
    m = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
    with pytest.raises(ValueError, match=r"^rules\[0\]\.match: matches no quantizable module "
                       r"\(names=\[\], types=\['MultiheadAttention'\]\); it matches 1 module\(s\) "
                       r"no fake-quant class covers \(1: MultiheadAttention\)"):
        qat.plan(m, {"rules": [{"match": {"types": ["MultiheadAttention"]},
                                "weight": {"bits": 8}}]})
