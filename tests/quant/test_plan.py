"""`plan` shows what stays float: modules with weights that no fake-quant class covers."""

import pytest
from torch import nn

import qat


def test_the_plan_names_what_no_fake_quant_class_covers():
    m = nn.Sequential(nn.Linear(4, 8), nn.Bilinear(4, 4, 4), nn.MultiheadAttention(4, 2))
    recipe = {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 8}}]}
    p = qat.plan(m, recipe)
    # MultiheadAttention is covered (its family), and so its out_proj is its own part.
    assert p.unquantizable == {"1": "Bilinear"}
    assert [lp.name for lp in p.quantized()] == ["0"]
    assert "not quantizable, stays float: 1 module(s) of type Bilinear (1)" in p.summary()
    assert [lp.name for lp in p.layers] == ["0", "2"]  # the attention stays float: no rule
    with pytest.warns(UserWarning, match=r"^not quantizable, stays float: 1 module\(s\)") as seen:
        qat.prepare(m, recipe)
    assert len([w for w in seen if "not quantizable" in str(w.message)]) == 1


def test_multihead_attention_without_its_family_lists_out_proj_as_float():
    # Without the family, MHA reads out_proj's weight without calling out_proj: a fake-quant
    # out_proj would never run, so it is listed as float rather than quantized.
    from qat.quant.family import Families

    core = Families([f for f in qat.shipped() if f.float_type is not nn.MultiheadAttention])
    p = qat.plan(nn.Sequential(nn.MultiheadAttention(4, 2)), {"rules": []}, families=core)
    assert p.unquantizable == {"0": "MultiheadAttention",
                               "0.out_proj": "NonDynamicallyQuantizableLinear"}  # fmt: skip


def test_a_rule_that_matches_only_float_modules_says_so():
    m = nn.Sequential(nn.Linear(4, 4), nn.Bilinear(4, 4, 4))
    with pytest.raises(ValueError, match=r"^rules\[0\]\.match: matches no quantizable module "
                       r"\(names=\[\], types=\['Bilinear'\]\); it matches 1 module\(s\) "
                       r"no fake-quant class covers \(1: Bilinear\)"):
        qat.plan(m, {"rules": [{"match": {"types": ["Bilinear"]}, "weight": {"bits": 8}}]})


@pytest.mark.parametrize("model,role,size,message", [
    (nn.Linear(64, 32), "input", 5, r"rules\[0\]\.input\.group_size: got 5; .*last dim 64"),
    (nn.Linear(64, 32), "output", 64, r"rules\[0\]\.output\.group_size: got 64; .*last dim 32"),
    (nn.Conv2d(3, 4, 3), "input", 4, r"rules\[0\]\.input\.granularity: got 'per_group'; .*varies"),
])  # fmt: skip
def test_per_group_activations_that_cannot_tile_the_last_dim_are_refused_at_plan(
    model, role, size, message
):
    """Found by the schema property: these passed `plan`, then failed in the first forward."""
    spec = {"dynamic": True, "granularity": "per_group", "group_size": size}
    recipe = {"rules": [{"match": {"types": [type(model).__name__]}, role: spec}]}
    with pytest.raises(ValueError, match=message):
        qat.plan(nn.Sequential(model), recipe)
    spec["group_size"] = 16
    if isinstance(model, nn.Linear):
        qat.plan(nn.Sequential(model), recipe)  # a divisor plans
