"""A layer family added through the registry alone, in this file: a float layer type the
project has never seen goes through prepare, training steps, convert, the parity gate,
save/load and ONNX Runtime with one `LayerFamily` entry and nothing edited in `qat/`."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.export import IntLinear, parity_report
from qat.export.onnx import ops
from qat.export.onnx.layers import linear_graph
from qat.models.registry import register
from qat.quant.modules import QATMixin
from tests.export.helpers import assert_onnx_exact


class Twice(nn.Module):
    """A float layer of its own: `2 * x @ W.T` (no bias)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * F.linear(x, self.weight)


class QATTwice(QATMixin, Twice):
    FLOAT_TYPE = Twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qout(2 * F.linear(self._qin(x), self.quantized_weight()))


class IntTwice(IntLinear):
    @classmethod
    def from_qat(cls, mod, weight_spec, input_spec, output_spec):
        return cls(mod.in_features, mod.out_features, False, weight_spec, input_spec, output_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)  # exact: doubling an fp32 value rounds nothing


def twice_graph(g, mod, x, t):
    return g.op("Mul", linear_graph(g, mod, x, t), ops.const(g, 2.0))


FAMILIES = qat.shipped().with_family(qat.LayerFamily(QATTwice, IntTwice, twice_graph))


@register("test_twice_mlp")
def twice_mlp(width: int = 8) -> nn.Module:
    return nn.Sequential(Twice(width, width), nn.ReLU(), nn.Linear(width, 3))


# A type outside torch.nn is named by its dotted path, as a recipe names transformers' types.
RECIPE = {"rules": [{"match": {"types": [f"{Twice.__module__}.Twice", "Linear"]},
                     "weight": {"bits": 4, "granularity": "per_channel", "learn": "lsq"},
                     "input": {"bits": 8, "symmetric": False, "observer": "ema"}}]}  # fmt: skip


def test_a_family_from_outside_goes_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = qat.models.registry.build_model("test_twice_mlp")
    plan = qat.plan(model, RECIPE)  # the shipped families know nothing of Twice: it stays float
    assert plan.unquantizable == {"0": "Twice"} and len(plan.quantized()) == 1
    model = qat.prepare(model, RECIPE, families=FAMILIES)
    assert type(model[0]) is QATTwice
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for _ in range(5):  # observers on in train mode, learned scales get gradients
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model[0].weight_quant.scale.grad is not None
    int_model = qat.convert(model.eval())
    assert type(int_model[0]) is IntTwice
    parity_report(model, int_model, [x[:16], x[16:]]).check()

    path = qat.save(int_model, tmp_path / "art")
    with pytest.raises(qat.export.ArtifactError, match=r"kind 'IntTwice'; known kinds: IntLinear"):
        qat.load(path)  # the shipped families cannot rebuild it
    loaded = qat.load(path, families=FAMILIES)
    assert type(loaded[0]) is IntTwice
    assert torch.equal(loaded(x), int_model(x))

    assert_onnx_exact(loaded, [(x[:16],), (x[16:],)], tmp_path / "m.onnx")


def test_two_families_cannot_share_an_integer_class():
    class Dense(nn.Linear):
        def forward(self, x):  # a forward of its own: not covered by the Linear family
            return super().forward(x)

    class QATDense(QATMixin, Dense):
        FLOAT_TYPE = Dense

    with pytest.raises(ValueError, match=r"two layer families with integer class IntLinear: give "
                       r"each family its own integer class"):
        qat.shipped().with_family(qat.LayerFamily(QATDense, IntLinear))
