"""The parity gate on every shipped recipe and model, and that it catches real errors."""

import json

import pytest
import torch
from torch import nn

import qat
from qat.export import IntLayer, ParityError, ParityReport, convert, parity_report
from qat.quant.modules import QATMixin

from .helpers import SHIPPED, recipe, trained

WEIGHT_ONLY = {"w8", "w4g32", "w8g32", "fp32"}
MODELS = [("cnn", "fold"), ("cnn", "merge"), ("cnn", "keep"), ("gpt", None), ("llama", None)]
MODELS.append(pytest.param("bert", None, marks=pytest.mark.skipif(
    pytest.importorskip("transformers") is None, reason="transformers")))  # fmt: skip


@pytest.mark.parametrize("kind,bn", MODELS)
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_passes_the_gate(kind, bn, name):
    r = recipe(name, bn=bn) if bn else recipe(name)
    if r.lora is not None and kind == "cnn":  # adapters name Llama projections: a CNN has none
        with pytest.raises(ValueError, match=r"lora\.target_modules .* matches none of the"):
            trained(kind, r)
        return
    if r.lora is not None and kind == "bert":  # the same adapters on BERT's own projection names
        r = recipe(name, lora={**r.to_dict()["lora"], "target_modules": ["query", "key", "value"]})
    model, batches = trained(kind, r)
    int_model = convert(model)
    n_qat = sum(isinstance(m, QATMixin) for m in model.modules())
    assert sum(isinstance(m, IntLayer) for m in int_model.modules()) == n_qat
    assert (n_qat == 0) == (name == "fp32")
    report = parity_report(model, int_model, batches)
    report.check()  # the default gate: full top-1 agreement, rel <= 1e-4
    assert report.output.rel < 5e-6, str(report)  # measured <= 7e-7: fp32 rounding only
    assert report.output.top1 == 1.0 and report.output.min_cosine > 1 - 1e-6
    if name in WEIGHT_ONLY and kind != "cnn":  # no BatchNorm arithmetic to reorder
        assert report.output.max_abs == 0.0  # dequantized weights are bit-identical
    assert len(report.layers) == n_qat and all(t.calls >= 1 for t in report.layers)


def test_gate_fails_on_a_wrong_scale_and_prints_the_report():
    model, batches = trained("gpt", recipe("w8a8"))
    int_model = convert(model)
    with torch.no_grad():
        int_model.blocks[1].mlp.up_proj.weight_scale.mul_(1 + 1e-3)
    report = parity_report(model, int_model, batches)
    bad = next(t for t in report.layers if t.name == "blocks.1.mlp.up_proj")
    assert 5e-4 < bad.rel < 2e-3  # alignment does not hide it: it is far beyond a tie
    with pytest.raises(ParityError, match=r"(?s)blocks\.1\.mlp\.up_proj: relative error.*max_abs"):
        report.check()


def test_gate_fails_on_one_weight_code_off_by_one():
    model, batches = trained("cnn", recipe("w8a8"))
    int_model = convert(model)
    with torch.no_grad():
        # conv1: its float output is compared (conv2's is quantized again, which can hide
        # so small a change on a few batches)
        codes = int_model.blocks[0].conv1.weight_codes
        codes.view(-1)[0] += 1 if codes.view(-1)[0] < 127 else -1
    with pytest.raises(ParityError, match=r"blocks\.0\.conv1: relative error"):
        parity_report(model, int_model, batches).check()


def test_nan_output_fails_the_gate():
    model, batches = trained("cnn", recipe("w8"))
    int_model = convert(model)

    def forward(m, batch):
        out = m(batch)
        if m is int_model:
            out[0, 0] = float("nan")
        return out

    report = parity_report(model, int_model, batches, forward=forward)
    assert report.to_dict()["output"]["rel"] == "nan"
    with pytest.raises(ParityError, match="output: relative error nan"):
        report.check()


def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    rules = [{"match": {"types": ["Linear"]}, "weight": {"bits": 8}, "input": {"bits": 8}}]
    qat.prepare(model, {"rules": rules})
    model(torch.randn(64, 8) * 3)
    return model.eval()


def _steer(module: nn.Module, values: torch.Tensor) -> None:
    module.register_forward_hook(lambda _m, _i, _o: values)


@pytest.mark.parametrize("shift,tied", [(0.004, True), (0.3, False)])
def test_rounding_ties_are_aligned_but_real_differences_are_not(shift, tied):
    """Both models' first layer is steered to values 0.002 steps below rounding boundaries of
    the second layer's input quantizer; the integer model's lies `shift` steps higher."""
    model = _two_layers()
    int_model = convert(model)
    s = int_model[1].input_scale.item()
    k = torch.arange(-100, 100, 5, dtype=torch.float32).reshape(5, 8)  # up to 100 steps
    near = (k + 0.498) * s
    _steer(model[0], near)
    _steer(int_model[0], near + shift * s)
    report = parity_report(model, int_model, [torch.randn(5, 8)])
    assert report.free_running.rel > 1e-3  # every code rounds the other way
    if tied:
        assert report.aligned == 40
        assert report.output.rel < 1e-6
        assert report.layers[1].rel < 1e-6
        report.check()
        with pytest.raises(ParityError, match="output: relative error"):
            parity_report(model, int_model, [torch.randn(5, 8)], tie_tolerance=0).check()
    else:
        assert report.aligned == 0 and report.output.rel > 1e-3
        with pytest.raises(ParityError, match=r"^export parity gate failed"):
            report.check()


def test_report_serialises_and_the_reference_is_left_as_it_was():
    model, batches = trained("gpt", recipe("w4a4_lsq"))
    model.train()
    model.apply(qat.quant.enable_observer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = parity_report(model, convert(model), batches)
    assert model.training and all(
        bool(q.observer_enabled) for q in qat.quant.quantizers(model).values()
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    d = json.loads(json.dumps(report.to_dict()))
    assert d["batches"] == 2 and d["output"]["top1"] == 1.0
    assert {t["name"] for t in d["layers"]} >= {"tok_emb", "lm_head", "blocks.0.attn.q_proj"}
    text = str(report)
    assert "blocks.1.mlp.down_proj" in text and "free running" in text
    assert isinstance(report, ParityReport) and report.failures() == []


def test_reference_must_be_the_converted_model():
    model, batches = trained("cnn", recipe("w8"))
    with pytest.raises(ValueError, match="reference model has no module 'conv1'"):
        parity_report(nn.Identity(), convert(model), batches)


def test_the_live_comparison_drops_each_reference_and_refuses_unequal_call_counts():
    """Each reference output is freed once compared (the gate then holds one layer's output at
    a time); a layer that ran more often on one side is an error naming both counts."""
    from qat.export.parity.compare import LayerComparison, live
    from qat.export.parity.report import TensorParity

    model = nn.Sequential(nn.Linear(2, 2))
    refs = {"0": [torch.zeros(1, 2), torch.zeros(1, 2)]}
    report = ParityReport(TensorParity("output"), [TensorParity("0")])
    with live(model, ["0"], LayerComparison(report, refs)):
        model(torch.zeros(1, 2))
        model(torch.zeros(1, 2))
    assert refs["0"] == [None, None] and report.layers[0].calls == 2
    refs = {"0": [torch.zeros(1, 2)]}
    with pytest.raises(ParityError, match=r"0 ran 1 time\(s\) in the reference but 2 in the "
                       r"integer model on the same batch"):  # fmt: skip
        with live(model, ["0"], LayerComparison(report, refs)):
            model(torch.zeros(1, 2))
            model(torch.zeros(1, 2))
