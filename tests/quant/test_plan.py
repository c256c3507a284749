"""`plan` shows what stays float: modules with weights that no fake-quant class covers."""

import pytest
from torch import nn

import qat


def test_the_plan_names_what_no_fake_quant_class_covers():
    m = nn.Sequential(nn.Linear(4, 8), nn.Bilinear(4, 4, 4), nn.MultiheadAttention(4, 2))
    recipe = {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 8}}]}
    p = qat.plan(m, recipe)
    # MultiheadAttention's in-projection is a raw parameter, and it reads out_proj's weight
    # without calling out_proj: a fake-quant out_proj would never run.
    assert p.unquantizable == {"1": "Bilinear", "2": "MultiheadAttention",
                               "2.out_proj": "NonDynamicallyQuantizableLinear"}  # fmt: skip
    assert [lp.name for lp in p.quantized()] == ["0"]
    note = "not quantizable, stays float: 3 module(s) of type Bilinear (1); "
    assert note + "MultiheadAttention (2); NonDynamicallyQuantizableLinear (2.out_proj)" in \
        p.summary()
    with pytest.warns(UserWarning, match=r"^not quantizable, stays float: 3 module\(s\)") as seen:
        qat.prepare(m, recipe)
    assert len([w for w in seen if "not quantizable" in str(w.message)]) == 1


def test_a_rule_that_matches_only_float_modules_says_so():
    m = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
    with pytest.raises(ValueError, match=r"^rules\[0\]\.match: matches no quantizable module "
                       r"\(names=\[\], types=\['MultiheadAttention'\]\); it matches 1 module\(s\) "
                       r"no fake-quant class covers \(1: MultiheadAttention\)"):
        qat.plan(m, {"rules": [{"match": {"types": ["MultiheadAttention"]},
                                "weight": {"bits": 8}}]})
