"""`convert`: what the integer model holds, and the errors for models it cannot export."""

import copy

import pytest
import torch
from torch import nn

import qat
from qat.export import ConvertError, IntConv2d, IntEmbedding, IntLayer, convert, parity_report
from qat.models.registry import build_model
from qat.quant import disable_fake_quant
from qat.quant.modules import QATMixin
from qat.quant.provenance import provenance

from .helpers import recipe, trained

LIN_W8A8 = {
    "rules": [
        {
            "match": {"types": ["Linear"]},
            "weight": {"bits": 8, "granularity": "per_channel"},
            "input": {"bits": 8, "symmetric": False},
        }
    ]
}


def test_convert_leaves_the_fake_quant_model_alone_and_keeps_its_identity():
    model, _ = trained("gpt", recipe("w4a8"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    int_model = convert(model)
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, QATMixin) for m in int_model.modules())
    n_int = sum(isinstance(m, IntLayer) for m in int_model.modules())
    assert n_int == sum(isinstance(m, QATMixin) for m in model.modules()) == 16
    origin = provenance(int_model)
    assert origin.builder == "gpt" and origin.build_args == provenance(model).build_args
    assert provenance(int_model).recipe.to_dict() == provenance(model).recipe.to_dict()
    assert not int_model.training


def test_fold_exports_exactly_the_folded_weights_training_quantized():
    model, _ = trained("cnn", recipe("w8a8", bn="fold"))
    int_model = convert(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int_model.modules())
    assert list(provenance(int_model).folded_bn) == [
        "bn1", "blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2",
        "blocks.1.shortcut.1"]  # fmt: skip
    qconv, iconv = model.blocks[1].conv1, int_model.blocks[1].conv1
    assert isinstance(iconv, IntConv2d)
    with torch.no_grad():
        assert torch.equal(iconv.dequantized_weight(), qconv.quantized_weight())
        # The bias as int32 codes of the grid training put it on (steps of s_x * s_w).
        assert iconv.bias.dtype == torch.int32
        assert torch.equal(iconv.float_bias(), qconv._qbias(qconv.folded_bias()))


def test_keep_leaves_a_float_batchnorm_after_the_integer_conv():
    model, _ = trained("cnn", recipe("w8a8", bn="keep"))
    int_model = convert(model)
    assert isinstance(int_model.conv1, IntConv2d) and isinstance(int_model.bn1, nn.BatchNorm2d)
    assert list(provenance(int_model).folded_bn) == []


@pytest.mark.parametrize(
    "spec",
    [
        {"bits": 4, "granularity": "per_channel"},
        {"bits": 8, "granularity": "per_channel", "axis": 1, "symmetric": False},
        {"bits": 4, "granularity": "per_group", "group_size": 4, "symmetric": False},
        {"bits": 8, "scale_dtype": "fp16"},
    ],
)
def test_int_embedding_is_bit_identical_to_the_fake_quant_table(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 12))
    rules = [{"match": {"types": ["Embedding"]}, "weight": spec, "output": {"bits": 8}}]
    qat.prepare(model, {"rules": rules})
    idx = torch.randint(0, 11, (3, 5))
    model(idx)  # calibrates
    int_model = convert(model.eval())
    assert isinstance(int_model[0], IntEmbedding)
    assert torch.equal(int_model(idx), model(idx))


def test_weight_only_layers_are_bit_identical():
    model, batches = trained("gpt", recipe("w4g32"))
    int_model = convert(model)
    with torch.no_grad():
        assert torch.equal(int_model(batches[0]), model(batches[0]))


LEARN_CASES = [
    ({"learn": "lsq_plus", "symmetric": False}, {"learn": "pact", "symmetric": False}),
    ({"learn": "lsq"}, {"learn": "lsq_plus", "symmetric": False, "scale_dtype": "fp16"}),
    ({"observer": "percentile", "scale_dtype": "fp16"}, {"learn": "pact"}),
    ({"observer": "mse"}, {"learn": "lsq", "symmetric": False, "observer": "ema"}),
]


@pytest.mark.parametrize("w,x", LEARN_CASES)
def test_every_learned_and_observed_quantizer_exports(w, x):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    rules = [
        {
            "match": {"types": ["Linear"]},
            "weight": {"bits": 4, "granularity": "per_channel", **w},
            "input": {"bits": 8, **x},
            "output": {"bits": 8, "symmetric": False},
        }
    ]
    qat.prepare(model, {"rules": rules})
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 16)).pow(2).mean().backward()
        opt.step()
    int_model = convert(model.eval())
    if w.get("learn") == "lsq_plus":
        assert int_model[0].weight_codes.dtype == torch.uint8
        assert int_model[0].weight_zero_point.float().std() > 0  # learned per channel
    report = parity_report(model, int_model, [torch.randn(32, 16) for _ in range(3)])
    report.check()
    assert report.output.rel < 5e-6


def test_tied_embedding_and_head_export(tmp_path):
    torch.manual_seed(0)
    model = build_model("gpt", preset="tiny", vocab_size=67, block_size=16, tie_weights=True)
    qat.prepare(model, recipe("w8a8"))
    model(torch.randint(0, 67, (2, 16)))
    int_model = convert(model.eval())
    batch = torch.randint(0, 67, (2, 16))
    parity_report(model, int_model, [batch]).check()
    with torch.no_grad():
        assert torch.equal(
            qat.load(qat.save(int_model, tmp_path / "tied"))(batch), int_model(batch)
        )


def test_conv1d_groups_circular_padding_per_group_weights_dynamic_input():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.Conv1d(8, 8, 3, groups=2, stride=2), nn.Flatten(), nn.Linear(8 * 4, 3),
    )  # fmt: skip
    rules = [
        {"match": {"types": ["Conv1d"]}, "weight": {"bits": 4, "granularity": "per_group",
                                                   "group_size": 6},
         "input": {"bits": 8, "dynamic": True, "symmetric": False}},
        {"match": {"types": ["Linear"]}, "weight": {"bits": 8}, "input": {"bits": 8}},
    ]  # fmt: skip
    qat.prepare(model, {"rules": rules})
    model(torch.randn(8, 4, 9))
    int_model = convert(model.eval())
    parity_report(model, int_model, [torch.randn(4, 4, 9) for _ in range(3)]).check()


def test_uncalibrated_quantizer_is_an_error_naming_the_layer():
    model = qat.prepare(build_model("gpt", preset="tiny", vocab_size=67), recipe("w8a8"))
    with pytest.raises(ConvertError, match=r"tok_emb: the weight quantizer was never calibrated"):
        convert(model)


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_unused_layer_error_suggests_ignore():
    model = qat.prepare(_TwoHeads(), LIN_W8A8)
    model(torch.randn(2, 4))
    with pytest.raises(ConvertError, match=r"^unused: the weight .*never calibrated.*`ignore`"):
        convert(model.eval())
    fixed = qat.prepare(_TwoHeads(), {**LIN_W8A8, "ignore": ["unused"]})
    fixed(torch.randn(2, 4))
    assert isinstance(convert(fixed.eval()).used, IntLayer)


def test_fake_quant_switched_off_is_an_error():
    model, _ = trained("cnn", recipe("w8a8"))
    model = copy.deepcopy(model)
    model.apply(disable_fake_quant)
    with pytest.raises(ConvertError, match="conv1: the weight quantizer has fake quant switched"):
        convert(model)


def test_unprepared_model_and_unsupported_layers_are_errors():
    with pytest.raises(ConvertError, match="not prepared for QAT"):
        convert(nn.Linear(2, 2))
    emb = nn.Sequential(nn.Embedding(4, 4, max_norm=1.0))
    qat.prepare(emb, {"rules": [{"match": {"types": ["Embedding"]}, "weight": {"bits": 8}}]})
    emb(torch.tensor([1]))
    with pytest.raises(ConvertError, match="max_norm"):
        convert(emb)
    lin = nn.Sequential(nn.Linear(4, 4))
    rules = [{"match": {"types": ["Linear"]}, "input": {"bits": 8},
              "weight": {"bits": 8, "granularity": "per_channel", "axis": 1}}]  # fmt: skip
    with pytest.raises(ValueError, match=r"^rules\[0\]\.weight\.axis: got 1; allowed: 0 \(output "
                       r"channels\) for Linear.*\(module '0'\)"):  # refused at plan, before QAT
        qat.prepare(lin, {"rules": rules})
