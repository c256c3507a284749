"""The digits ResNet: shapes, fx-visible Conv->BN pairs, and that it can learn."""

import torch
import torch.fx
from torch import nn

from qat.models import DigitsResNet, build_model
from qat.quant.provenance import provenance


def test_logits_shape_and_config():
    model = build_model("cnn", widths=[8, 16, 32], blocks_per_stage=2, num_classes=7)
    assert isinstance(model, DigitsResNet)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 7)
    assert model.config.widths == [8, 16, 32]
    args = provenance(model).build_args
    assert args == {"widths": [8, 16, 32], "blocks_per_stage": 2, "num_classes": 7}


def test_every_conv_feeds_only_its_batchnorm_in_the_fx_graph():
    model = build_model("cnn")
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    convs = [
        n for n in graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)
    ]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 6
    for node in convs:
        assert modules[node.target].bias is None
        (user,) = node.users
        assert user.op == "call_module" and isinstance(modules[user.target], nn.BatchNorm2d)
        assert user.target.rpartition(".")[0] == node.target.rpartition(".")[0]  # same block
    adds = [n for n in graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 2  # one residual add per block


def test_traced_graph_computes_the_same_logits():
    model = build_model("cnn").eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


def test_a_few_steps_fit_one_batch():
    torch.manual_seed(0)
    model = build_model("cnn", widths=[16, 32])
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
