"""LoRA-QAT: adapters merged before the weight quantizer, so the export holds what trained."""

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import qat
from qat.models.gpt import GPT, GPTConfig
from qat.quant.lora import LoRA, LoraSpec

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _recipe(name="w4g32", **lora):
    r = yaml.safe_load(open(f"configs/recipe/{name}.yaml"))
    r["lora"] = {"r": 4, "lora_alpha": 8, "target_modules": PROJ, **lora}
    return r


def _gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, d_model=64, **kw))


def _trained(steps=6):
    """A tiny GPT, LoRA-QAT'd for a few AdamW steps on random tokens."""
    m = qat.prepare(_gpt(), _recipe())
    x = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    qat.quant.calibrate(m, [x], num_batches=1)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), x


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"r": 0, "target_modules": ["q_proj"]}, "lora.r: got 0"),
        ({"r": 4}, "lora.target_modules: got None"),
        ({"r": 4, "target_modules": []}, "lora.target_modules: got []"),
        ({"r": 4, "target_modules": ["q"], "lora_dropout": 1.0}, "lora.lora_dropout"),
        ({"r": 4, "target_modules": ["q"], "use_dora": True}, "lora.use_dora"),
    ],
)
def test_bad_lora_blocks_are_one_line_errors(raw, needle):
    with pytest.raises(ValueError, match="^" + needle.replace("[", r"\[").replace("]", r"\]")):
        qat.quant.Recipe.from_dict({"lora": raw})


def test_scaling_and_peft_config_follow_peft():
    s = LoraSpec.parse({"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"],
                        "use_rslora": True})  # fmt: skip
    assert s.scaling == 32 / 4
    cfg = s.peft_config()
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, set(cfg.target_modules)) == (
        16, 32, True, {"q_proj"})


def test_the_update_is_peft_lora_linear_update():
    """Our merged weight computes what peft's LoRA Linear (dropout off) computes."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 6))
    spec = LoraSpec.parse({"r": 3, "lora_alpha": 5, "target_modules": ["0"],
                           "use_rslora": True})  # fmt: skip
    ours = LoRA(6, 12, spec.r, spec.scaling)
    nn.init.normal_(ours.B)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**{
        "r": 3, "lora_alpha": 5, "target_modules": ["0"], "use_rslora": True}))
    layer = peft_model.base_model.model[0]
    layer.lora_A["default"].weight.data.copy_(ours.A)
    layer.lora_B["default"].weight.data.copy_(ours.B)
    x = torch.randn(5, 12)
    want = peft_model(x)
    got = F.linear(x, ours.merge(base[0].weight), base[0].bias)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_only_adapters_and_learned_scales_train_and_base_weights_stay_put():
    m = qat.prepare(_gpt(), _recipe())
    before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n or n.endswith("weight_quant.scale") for n in trainable)
    assert {n.rsplit(".", 2)[0] for n in trainable if ".lora." in n} == {
        f"blocks.{b}.{p}" for b in range(2) for p in
        ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}  # fmt: skip
    trained, _ = _trained()
    for n, p in trained.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert trained.blocks[0].attn.q_proj.lora.B.abs().sum() > 0  # the adapters did move


def test_export_holds_the_grid_points_of_the_merged_weight():
    """Codes times scales == Q(W + (alpha/r) B A), written out; not Q(W); and the integer
    model computes exactly what the trained fake-quant model computes."""
    m, x = _trained()
    layer = m.blocks[1].mlp.down_proj
    with torch.no_grad():
        merged = layer.weight + 2.0 * (layer.lora.B @ layer.lora.A)  # alpha 8 / r 4
        s = layer.weight_quant.qparams()[0].float().reshape(merged.shape[0], -1, 1)
        g = merged.reshape(merged.shape[0], -1, 32)  # groups of 32 along the input
        want = (torch.clamp(torch.round(g / s), -8, 7) * s).reshape(merged.shape)
        base_only = layer.weight_quant(layer.weight)
    im = qat.convert(copy.deepcopy(m))
    got = im.blocks[1].mlp.down_proj.dequantized_weight()
    assert torch.equal(got, want)
    assert not torch.equal(got, base_only)  # the adapters changed codes
    with torch.no_grad():
        assert torch.equal(im(x), m(x))


def test_lora_survives_a_state_dict_round_trip_through_prepare():
    """A checkpoint's state loads into a model prepared from the same recipe (resume path)."""
    m, x = _trained()
    fresh = qat.prepare(_gpt(), _recipe()).eval()
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_dropout_drops_whole_input_columns_in_training_only():
    lora = LoRA(4, 10, 2, 1.0, dropout=0.5)
    nn.init.normal_(lora.B)
    torch.manual_seed(3)
    d = lora.delta()
    zero_cols = (d == 0).all(0)
    assert 0 < zero_cols.sum() < 10
    kept = ~zero_cols
    torch.testing.assert_close(d[:, kept], 2 * (lora.B @ lora.A)[:, kept])
    lora.eval()
    assert torch.equal(lora.delta(), lora.B @ lora.A)


@pytest.mark.parametrize(
    "lora, needle",
    [
        ({"target_modules": ["nope"]}, "matches none of the"),
        ({"target_modules": ["lm_head"]}, "lm_head, which the recipe does not quantize"),
        ({"target_modules": PROJ, "exclude_modules": ["q_proj"]}, None),
    ],
)
def test_targets_are_checked_at_plan_time(lora, needle):
    recipe = _recipe("w4g32", **lora)
    recipe["ignore"] = ["lm_head"]
    if needle is None:
        p = qat.plan(_gpt(), recipe)
        assert p.lora_targets and not any(n.endswith("q_proj") for n in p.lora_targets)
        assert f"lora: r 4, alpha 8 on {len(p.lora_targets)} layers" in p.summary()
        return
    with pytest.raises(ValueError, match=needle):
        qat.plan(_gpt(), recipe)


def test_a_tied_weight_cannot_take_one_adapter():
    recipe = _recipe("q4_0", target_modules=["lm_head"])
    with pytest.raises(ValueError, match="lm_head shares its weight with tok_emb"):
        qat.plan(_gpt(tie_weights=True), recipe)


def test_the_float_view_of_a_lora_qat_model_is_the_float_model_and_the_distillation_teacher():
    """Trained adapters and scales, observers on: inside `float_view` the prepared model
    computes the float model's logits bit for bit (so LoRA-QAT keeps no teacher copy), and
    after it every switch, adapter and mode is back (the same outputs, observers untouched)."""
    from qat.quant.float_view import float_view
    from qat.train.module import QATModule

    trained, x = _trained()
    trained.train()
    qat.quant.enable_observer(trained.blocks[0].attn.q_proj.input_quant)
    with torch.no_grad():
        want = _gpt()(x[:, :-1])  # the model before prepare: same seed, untrained base
        before = trained.eval()(x[:, :-1])
        trained.train()
        saved = {k: v.clone() for k, v in trained.state_dict().items()}
        with float_view(trained):
            got = trained(x[:, :-1])
        assert trained.training and trained.blocks[0].attn.q_proj.lora is not None
        assert all(torch.equal(v, trained.state_dict()[k]) for k, v in saved.items())
        assert torch.equal(got, want) and not torch.equal(before, want)
        assert torch.equal(trained.eval()(x[:, :-1]), before)
    module = QATModule(trained, "causal_lm", kd_weight=1.0, distill_from_base=True)
    assert module.teacher is None
    assert torch.equal(module._teacher_out({"x": x[:, :-1], "y": x[:, 1:]}), want)
