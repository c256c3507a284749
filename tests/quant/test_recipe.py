from pathlib import Path

import pytest
import torch
from torch import nn

import qat
from qat.models.registry import build_model
from qat.quant import FakeQuantizer, Recipe, quantizers
from qat.quant.modules import QATEmbedding, QATLinear

RECIPE_DIR = Path(__file__).resolve().parents[2] / "configs" / "recipe"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def cnn():
    torch.manual_seed(0)
    return build_model("cnn")


def gpt():
    torch.manual_seed(0)
    return build_model("gpt", preset="tiny", vocab_size=67, block_size=32)


def _run(model, x):
    model.train()
    out = model(x)
    out.float().pow(2).mean().backward()
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("builder", [cnn, gpt], ids=["cnn", "gpt"])
def test_every_shipped_recipe_validates_and_prepares(path, builder):
    recipe = Recipe.from_yaml(path)
    assert recipe.description, f"{path.name} needs a description"
    assert path.read_text().startswith("#"), f"{path.name} needs a header comment"
    model = builder()
    x = torch.randn(4, 1, 8, 8) if builder is cnn else torch.randint(0, 67, (2, 16))
    if recipe.lora is not None and builder is cnn:  # adapters name transformer projections
        with pytest.raises(ValueError, match="lora.target_modules .* matches none of the"):
            qat.prepare(model, recipe)
        return
    qat.prepare(model, recipe)
    _run(model, x)  # calibrates
    out = _run(model, x)
    assert torch.isfinite(out).all()
    n_quant = len(quantizers(model))
    assert (n_quant == 0) == recipe.is_float()


def test_plan_is_a_dry_run_and_shows_rules():
    model = gpt()
    before = {n: type(m) for n, m in model.named_modules()}
    p = qat.plan(model, RECIPE_DIR / "w4a4_lsq.yaml")
    assert {n: type(m) for n, m in model.named_modules()} == before
    rows = {lp.name: lp for lp in p.layers}
    assert rows["tok_emb"].specs["weight"].bits == 8  # first layer at 8 bits
    assert rows["tok_emb"].rules == [1, 3]
    assert rows["lm_head"].specs["weight"].bits == 8  # last layer at 8 bits
    assert rows["blocks.0.attn.q_proj"].specs["weight"].bits == 4
    text = str(p)
    assert "blocks.0.mlp.gate_proj" in text and "4b per_channel(axis=0) sym mse lsq" in text


def test_later_rule_overrides_field_by_field_and_ignore_and_null_roles():
    model = gpt()
    recipe = {
        "rules": [
            {
                "match": {"types": ["Linear"]},
                "weight": {"bits": 4, "granularity": "per_channel"},
                "input": {"bits": 8},
            },
            {"match": {"names": ["blocks.*.mlp.*"]}, "weight": {"bits": 6}},
            {"match": {"names": ["re:^blocks\\.1\\.attn"]}, "input": None},
        ],
        "ignore": ["lm_head"],
    }
    rows = {lp.name: lp for lp in qat.plan(model, recipe).layers}
    up = rows["blocks.0.mlp.up_proj"].specs["weight"]
    assert (up.bits, up.granularity) == (6, "per_channel")
    assert rows["blocks.1.attn.q_proj"].specs["input"] is None
    assert rows["blocks.0.attn.q_proj"].specs["input"].bits == 8
    assert rows["lm_head"].ignored and not rows["lm_head"].quantized
    assert not rows["tok_emb"].quantized  # Embedding matched by no rule: float


@pytest.mark.parametrize(
    "recipe,match",
    [
        (
            {
                "rules": [
                    {"match": {"types": ["Linear"]}, "weight": {"bits": 8}},
                    {"match": {"types": ["Linear"]}, "weight": {"bits": 12}},
                ]
            },
            r"rules\[1\]\.weight\.bits: got 12; allowed: an integer from 2 to 8",
        ),
        ({"rulez": []}, r"recipe\.rulez: got 'rulez'; allowed: rules, ignore, bn"),
        (
            {"rules": [{"match": {"types": ["Linaer"]}}]},
            r"rules\[0\]\.match\.types\[0\]: got 'Linaer'; allowed: a torch\.nn class name",
        ),
        (
            {"rules": [{"match": {"names": "x"}, "weight": {"bitz": 4}}]},
            r"rules\[0\]\.weight\.bitz: got 'bitz'",
        ),
        (
            {"rules": [{"match": {"names": ["re:("]}}]},
            r"rules\[0\]\.match\.names\[0\]: got 're:\('",
        ),
        ({"rules": {"match": {}}}, r"rules: got .*allowed: a list of rules"),
        ({"bn": "fuse"}, r"bn: got 'fuse'; allowed: fold, merge, keep"),
        ({"schedule": {"calibrate": -1}}, r"schedule\.calibrate: got -1"),
        ({"schedule": {"calibrate": 0.5}}, r"schedule\.calibrate: got 0\.5; allowed: a number"),
        ({"schedule": {"warmup": 5}}, r"schedule\.warmup: got 'warmup'"),
        (
            {"rules": [{"match": {"types": ["Linear"]}, "optional": "yes"}]},
            r"rules\[0\]\.optional: got 'yes'; allowed: true or false",
        ),
    ],
)
def test_recipe_errors_name_the_key_path(recipe, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict(recipe)


def test_resolution_errors_name_rules_and_module():
    with pytest.raises(ValueError, match=r"rules\[0\]\.match: matches no quantizable module"):
        qat.plan(cnn(), {"rules": [{"match": {"names": ["blocks.*.attn.*"]}, "weight": {}}]})
    assert qat.plan(cnn(), {"rules": [{"match": {"names": ["nope"]}, "optional": True,
                                       "weight": {"bits": 8}}]})
    bad = {
        "rules": [
            {
                "match": {"types": ["Linear"]},
                "weight": {"granularity": "per_group", "group_size": 48},
            }
        ]
    }
    with pytest.raises(ValueError, match=r"rules\[0\]\.weight\.group_size: got 48.*'head'"):
        qat.plan(cnn(), bad)
    merged = {
        "rules": [
            {
                "match": {"types": ["Linear"]},
                "weight": {"granularity": "per_group", "group_size": 32},
            },
            {"match": {"names": ["head"]}, "weight": {"granularity": "per_channel"}},
        ]
    }
    with pytest.raises(ValueError, match=r"rules\[0\]\+rules\[1\]\.weight\.group_size: got 32"):
        qat.plan(cnn(), merged)


def test_from_yaml_and_dictconfig(tmp_path):
    from omegaconf import OmegaConf

    f = tmp_path / "r.yaml"
    f.write_text("rules:\n  - match: {types: [Linear]}\n    weight: {bits: 3}\n")
    r = Recipe.from_yaml(f)
    assert r.rules[0].specs["weight"] == {"bits": 3}
    assert Recipe.from_dict(OmegaConf.create(r.to_dict())) == r
    (tmp_path / "bad.yaml").write_text("rules: [\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:2:1: invalid YAML: expected the node"):
        Recipe.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")


def test_prepare_shares_parameters_and_refuses_twice():
    model = gpt()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    qat.prepare(model, RECIPE_DIR / "w8a8.yaml")
    assert isinstance(model.blocks[0].attn.q_proj, QATLinear)
    assert isinstance(model.tok_emb, QATEmbedding)
    assert model.blocks[0].attn.q_proj.weight is params["blocks.0.attn.q_proj.weight"]
    before = model.lm_head.weight.detach().clone()
    x = torch.randint(0, 67, (2, 8))
    model(x).logsumexp(-1).mean().backward()
    opt.step()  # the optimizer built before prepare updates the shared weight
    assert not torch.equal(before, model.lm_head.weight)
    with pytest.raises(ValueError, match="already prepared for QAT"):
        qat.prepare(model, RECIPE_DIR / "w8a8.yaml")


@pytest.mark.parametrize("path", [RECIPE_DIR / "w4a4_lsq.yaml", RECIPE_DIR / "w4g32.yaml"])
def test_state_dict_reproduces_outputs_bit_for_bit(path):
    a = qat.prepare(gpt(), path)
    x = torch.randint(0, 67, (2, 16))
    for _ in range(2):
        _run(a, x)
    b = qat.prepare(gpt(), path)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    a.apply(qat.quant.disable_observer), b.apply(qat.quant.disable_observer)
    assert torch.equal(a(x), b(x))


def test_switches_apply_to_every_quantizer():
    model = qat.prepare(cnn(), RECIPE_DIR / "w8a8.yaml")
    model.apply(qat.quant.disable_fake_quant)
    model.apply(qat.quant.freeze_observer)
    qs = quantizers(model).values()
    assert all(not q.fake_quant_enabled and not q.observer_enabled for q in qs)
    model.apply(qat.quant.freeze_bn_stats)
    assert all(bool(m.bn_frozen) for m in model.modules() if hasattr(m, "bn_frozen"))
    assert all(isinstance(q, FakeQuantizer) for q in qs)


def test_unsupported_subclass_with_own_forward_stays_float():
    class Weird(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(Weird(4, 4), nn.Linear(4, 4))
    rows = qat.plan(m, {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 8}}]}).layers
    assert [lp.name for lp in rows] == ["1"]
