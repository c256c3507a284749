"""GPTQ over a model: which layers, in which stages, on which inputs, and what `convert` gets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.models.registry import build_model
from qat.ptq import GPTQConfig, apply_gptq
from qat.ptq.runner import _call_stages, _targets, layer_rows
from qat.quant.modules import QATConv2d

W4G16 = {"rules": [{"match": {"types": ["Linear"]}, "weight": {
    "bits": 4, "granularity": "per_group", "group_size": 16}}]}  # fmt: skip


def tokens(seed: int, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 67, (2, 32), generator=g) for _ in range(n)]


def gpt(recipe=W4G16, tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = build_model("gpt", preset="tiny", vocab_size=67, block_size=32, tie_weights=tie)
    return qat.prepare(m, recipe)


def calibrated(model: nn.Module, batches) -> nn.Module:
    qat.quant.calibrate(model, batches, num_batches=len(batches))
    return model


def test_stages_group_the_layers_that_read_one_tensor():
    model = calibrated(gpt(), tokens(0))
    layers = _targets(model, qat.ptq.GPTQReport())
    stages = _call_stages(model, tokens(0)[0], lambda m, b: m(b), layers)
    block = [["blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj"],
             ["blocks.0.attn.o_proj"], ["blocks.0.mlp.gate_proj", "blocks.0.mlp.up_proj"],
             ["blocks.0.mlp.down_proj"]]  # fmt: skip
    assert stages[:4] == block and stages[-1] == ["lm_head"] and len(stages) == 9


def test_convert_exports_exactly_gptqs_codes():
    model = calibrated(gpt(), tokens(0))
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, nn.Linear)}  # fmt: skip
    report = apply_gptq(model, tokens(0))
    assert len(report.quantized) == 15 and not report.kept_rtn
    int_model = qat.convert(model)
    layers = dict(int_model.named_modules())
    for name, mod in model.named_modules():
        if name in before:
            wq, codes = mod.weight_quant, layers[name].dequantized_weight()
            assert not wq.observer_enabled
            assert torch.equal(wq(mod.weight).detach(), codes)
            # Where GPTQ kept round-to-nearest's code the weight is still float; where it
            # moved one, the weight sits on the new code.
            rtn = wq(before[name]).detach()
            kept = rtn == codes
            assert 0 < int(kept.sum()) < kept.numel()
            assert torch.equal(mod.weight[kept], before[name][kept])
            assert torch.equal(mod.weight[~kept], codes[~kept])


def logits_error(model: nn.Module, reference: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float(F.mse_loss(model(b), reference(b))) for b in batches)


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "float inputs"])
def test_gptq_model_is_closer_to_float_than_round_to_nearest(sequential):
    torch.manual_seed(0)
    float_model = build_model("gpt", preset="tiny", vocab_size=67, block_size=32).eval()
    cal, held = tokens(0, 8), tokens(1)
    rtn = calibrated(qat.prepare(_copy(float_model), W4G16), cal).eval()
    gptq = calibrated(qat.prepare(_copy(float_model), W4G16), cal)
    apply_gptq(gptq, cal, GPTQConfig(sequential=sequential, block_size=32))
    assert logits_error(gptq.eval(), float_model, held) < 0.8 * logits_error(rtn, float_model, held)


def _copy(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)


def test_sequential_and_float_inputs_measure_different_hessians():
    a, b = calibrated(gpt(), tokens(0)), calibrated(gpt(), tokens(0))
    apply_gptq(a, tokens(0), GPTQConfig(sequential=True))
    apply_gptq(b, tokens(0), GPTQConfig(sequential=False))
    first = "blocks.0.attn.q_proj"  # sees the embedding alone: the same input both ways
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    assert torch.equal(mods_a[first].weight, mods_b[first].weight)
    assert not torch.equal(mods_a["lm_head"].weight, mods_b["lm_head"].weight)


def test_a_tied_head_and_embeddings_keep_round_to_nearest():
    recipe = {"rules": [{"match": {"types": ["Linear", "Embedding"]},
                         "weight": {"bits": 8, "granularity": "per_channel"}}]}  # fmt: skip
    model = calibrated(gpt(recipe, tie=True), tokens(0))
    report = apply_gptq(model, tokens(0))
    assert report.kept_rtn == {"tok_emb": "QATEmbedding layers", "lm_head": "shared weights"}
    assert report.summary() == ("GPTQ: 14 layers; 2 kept round-to-nearest "
                                "(QATEmbedding layers, shared weights)")  # fmt: skip


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, dilation=2, padding=2),
                                dict(padding=1, padding_mode="reflect")],
                         ids=["same", "strided dilated", "reflect"])  # fmt: skip
def test_conv_rows_times_the_weight_are_the_convolution(kw):
    conv = nn.Conv2d(3, 5, 3, bias=False, **kw)
    q = QATConv2d.from_float(conv, weight=qat.QuantSpec(bits=8), name="c")
    x = torch.randn(2, 3, 9, 9)
    rows = layer_rows(q, x)  # (B * L, C * k * k)
    y = conv(x)
    got = (rows @ conv.weight.reshape(5, -1).T).reshape(2, -1, 5).transpose(1, 2)
    torch.testing.assert_close(got, y.reshape(2, 5, -1))


def test_bn_folded_convolutions_take_gptq_on_the_folded_weight_and_export_its_codes():
    """A Conv2d+BN pair quantizes (and exports) `w * gamma / std`: GPTQ chooses codes for
    that folded weight, and the latent weight is set so that folding it gives those codes."""
    rule = {"match": {"types": ["Conv2d", "Linear"]},
            "weight": {"bits": 4, "granularity": "per_channel"}}  # fmt: skip
    torch.manual_seed(0)
    model = qat.prepare(build_model("cnn", widths=[8, 16]), {"rules": [rule], "bn": "fold"})
    xs = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    calibrated(model, xs)
    model.train()
    for _ in range(3):  # running statistics away from 0 / 1: the fold is not the identity
        model(torch.randn(8, 1, 8, 8) * 3 + 1)
    model.eval()
    folds = {n: m for n, m in model.named_modules() if type(m).__name__ == "QATConvBn2d"}
    with torch.no_grad():  # a channel BN zeroes (zero-init residuals, pruned channels)
        folds["blocks.0.conv2"].bn.weight[1] = 0.0
    rtn = {n: m.weight_quant(m.folded_weight()).detach() for n, m in folds.items()}
    report = apply_gptq(model, xs)
    assert not report.kept_rtn and set(folds) <= set(report.quantized)
    layers = dict(qat.convert(model).named_modules())
    moved = 0
    for name, mod in folds.items():
        codes = layers[name].dequantized_weight()
        assert torch.equal(mod.weight_quant(mod.folded_weight()).detach(), codes)
        assert torch.isfinite(mod.weight).all()
        moved += int((codes != rtn[name]).sum())
    assert moved > 0  # GPTQ chose other codes than round-to-nearest somewhere


def _gptq_weights(model: nn.Module, batches, forward=None) -> dict[str, torch.Tensor]:
    apply_gptq(model, batches, GPTQConfig(block_size=16), forward)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _counted(forward):
    calls = [0]

    def fn(m, b):
        calls[0] += 1
        return forward(m, b)

    return fn, calls


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_cached_block_inputs_give_the_whole_model_passes_codes(family, monkeypatch):
    """Sequential GPTQ runs a transformer one block at a time on cached inputs: the same
    Hessians, so the same codes, as re-running the whole model for every stage, with far
    fewer whole-model passes."""
    from tests.export.helpers import LLAMA

    def build():
        if family == "gpt":
            return gpt()
        torch.manual_seed(0)
        m = build_model("hf_causal_lm", config={**LLAMA, "num_hidden_layers": 3}, seed=0)
        return qat.prepare(m, W4G16)

    batches = [b % 100 for b in tokens(0, 3)]
    runs = []
    for cached in (True, False):
        if not cached:
            monkeypatch.setattr(qat.ptq.runner, "block_plan", lambda *a: None)
        model = calibrated(build(), batches)
        forward, calls = _counted(lambda m, b: m(b))
        runs.append((_gptq_weights(model, batches, forward), calls[0]))
    (cached_w, cached_calls), (whole_w, whole_calls) = runs
    assert cached_w.keys() == whole_w.keys()
    assert all(torch.equal(cached_w[k], whole_w[k]) for k in cached_w)
    # cached: stages + chain check + block-0 inputs (3) + the head's stage (3)
    assert cached_calls == 1 + 1 + 3 + 3 < whole_calls


class _Twice(nn.Module):
    """Calls its one block twice: not a chain of distinct blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))

    def forward(self, x):
        return self.blocks[1](self.blocks[0](self.blocks[0](x)))


def test_a_model_that_is_not_a_chain_gets_no_block_plan():
    from qat.ptq.blocks import block_plan

    rule = {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 4}}]}
    model = qat.prepare(_Twice(), rule)
    xs = [torch.randn(4, 8) for _ in range(2)]
    calibrated(model, xs)
    layers = _targets(model, qat.ptq.GPTQReport())
    stages = _call_stages(model, xs[0], lambda m, b: m(b), layers)
    assert block_plan(model, stages, lambda: model(xs[0])) is None
    assert len(apply_gptq(model, xs).quantized) == 2  # whole-model passes instead
    chain = calibrated(gpt(), tokens(0))
    layers = _targets(chain, qat.ptq.GPTQReport())
    stages = _call_stages(chain, tokens(0)[0], lambda m, b: m(b), layers)
    plan = block_plan(chain, stages, lambda: chain(tokens(0)[0]))
    assert plan is not None and len(plan.blocks) == 2 and plan.after == [["lm_head"]]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(h))) * mask[..., None]


class _MeanPooled(nn.Module):
    """A sentence encoder in miniature (a chain of two blocks, so sequential GPTQ runs them on
    cached inputs): its output never reads the padded positions."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.blocks = nn.Embedding(50, 16), nn.ModuleList([_Block(), _Block()])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h, mask)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def _pooled_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("sequential", [True, False])
def test_padding_does_not_reach_gptqs_hessians(sequential):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 12)
    mask[1:, 7:] = 0
    ids = torch.randint(0, 50, (4, 12), generator=g)
    other = torch.where(mask.bool(), ids, torch.randint(0, 50, (4, 12), generator=g))
    codes = []
    for pad_ids in (ids, other):  # the same sentences, different tokens under the padding
        torch.manual_seed(0)
        model = qat.prepare(_MeanPooled(), W4G16)
        batch, fwd = {"input_ids": pad_ids, "attention_mask": mask}, _pooled_forward
        qat.quant.calibrate(model, [batch], num_batches=1, forward=fwd)
        apply_gptq(model, [batch], GPTQConfig(sequential=sequential), forward=fwd,
                   token_mask=lambda b: b["attention_mask"])  # fmt: skip
        layers = dict(qat.convert(model).named_modules())
        codes.append([layers[f"blocks.{i}.{n}"].dequantized_weight()
                      for i in (0, 1) for n in ("up", "down")])  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(*codes, strict=True))
