"""ONNX export: QDQ structure read back with `onnx`, ONNX Runtime against the integer executor."""

import builtins
import collections
import functools

import numpy as np
import pytest
import torch
from torch import nn

import qat
from qat.export.onnx import export_onnx, ort_session
from qat.export.onnx.cpu import (
    FAMILIES,
    cpu_family,
    emulate,
    inexact_layers,
    pair_saturated_matmul,
)
from qat.export.onnx.parity import gate_onnx, onnx_parity, onnx_parity_report
from qat.export.parity.report import ParityError

from .helpers import recipe, trained

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, numpy_helper  # noqa: E402

# Aligned per-layer error where the integer arithmetic is exact: only the fp32 rescale and
# float ops differ (measured <= 9e-7 on every model and recipe here).
EXACT = 1e-6
# Every parity test proves both CPU kernel families: ONNX Runtime on this machine, and the
# other family's integer kernels emulated (the rest of the graph is the same float code).
FAMILY = cpu_family()
OTHER = next(f for f in FAMILIES if f != FAMILY)


def _per_tensor_w8a8() -> qat.Recipe:
    rules = recipe("w8a8").to_dict()["rules"]
    rules[0]["weight"]["granularity"] = "per_tensor"
    return qat.Recipe.from_dict({**recipe("w8a8").to_dict(), "rules": rules})


@functools.cache
def _converted(kind: str, rec: str):
    """(integer model, held-out batches), trained once per session (export leaves it as it was)."""
    model, batches = trained(kind, _per_tensor_w8a8() if rec == "w8a8_per_tensor" else recipe(rec))
    return qat.convert(model), batches


def _export(kind, rec, tmp_path, **kw):
    int_model, batches = _converted(kind, rec)
    path = export_onnx(int_model, (batches[0],), tmp_path / f"{kind}.onnx", **kw)
    return int_model, batches, onnx.load(path), path


def _nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def _attr(node, name):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                None)  # fmt: skip


def _weight_dq(model, layer):
    return next(n for n in _nodes(model, "DequantizeLinear") if n.input[0] == f"{layer}.weight_q")


def _outputs(int_model, batches):
    with torch.no_grad():
        return [qat.export.parity.measure.as_tensor(int_model(b)) for b in batches]


def _assert_exact(int_model, path, batches, target="any"):
    """ONNX Runtime here, and the other family's kernels (emulated), compute what the
    integer executor computes: every layer within fp32 rounding, every output the same."""
    report = onnx_parity_report(int_model, path, [(b,) for b in batches])
    assert report.failures() == [], str(report)
    assert max(t.rel for t in report.layers) <= EXACT, str(report)
    assert report.free_running.top1 == 1.0
    ref = _outputs(int_model, batches)
    with emulate(int_model, OTHER, target):
        other = _outputs(int_model, batches)
    assert all(torch.equal(a, b) for a, b in zip(ref, other, strict=True)), OTHER
    assert inexact_layers(int_model, target, OTHER) == []
    return report


def test_cnn_with_folded_bn_is_int8_qdq_and_exact(tmp_path):
    int_model, batches, model, path = _export("cnn", "w8a8", tmp_path)
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n, m in int_model.named_modules() if isinstance(m, qat.export.IntConv2d)]
    assert len(convs) == 6 and not any(n.endswith("bn1.weight") for n in inits)  # BN folded
    for name in [*convs, "head"]:
        assert f"{name}.weight" not in inits
    for name in convs:  # full-range codes on the integer kernels: uint8 + 128, exact anywhere
        assert inits[f"{name}.weight_q"].data_type == TensorProto.UINT8
        assert inits[f"{name}.bias_q"].data_type == TensorProto.INT32
    assert _attr(_weight_dq(model, "conv1"), "axis") == 0  # per output channel
    assert _attr(_weight_dq(model, "head"), "axis") == 1  # (in, out) layout for MatMul
    assert _nodes(model, "QuantizeLinear") and not any(
        n.op_type == "QuantizeLinear" and n.input[0].endswith("weight") for n in model.graph.node
    )
    codes = numpy_helper.to_array(inits["conv1.weight_q"]).astype(np.int16) - 128
    assert np.array_equal(codes, int_model.conv1.int_weight().numpy())
    # The head runs on the integer GEMM: its codes are stored + 128 with zero point 128.
    assert inits["head.weight_q"].data_type == TensorProto.UINT8
    head = numpy_helper.to_array(inits["head.weight_q"]).astype(np.int16) - 128
    assert np.array_equal(head, int_model.head.int_weight().T.numpy())
    assert set(numpy_helper.to_array(inits["head.weight_zero_point"]).ravel()) == {128}
    _assert_exact(int_model, path, batches)


def _optimized_ops(path, tmp_path) -> collections.Counter:
    """Op types of the graph ONNX Runtime runs (its fusions, without hardware-specific ones)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_cnn_convs_run_as_qlinearconv_with_the_int32_biases_training_used(tmp_path):
    """7-bit weights are int8 codes that no CPU saturates: every Conv becomes ONNX Runtime's
    integer QLinearConv (8-bit in and out, the bias as int32 codes), none runs in float."""
    int_model, batches, model, path = _export("cnn", "w7a8", tmp_path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = {n: m for n, m in int_model.named_modules() if isinstance(m, qat.export.IntConv2d)}
    for name, conv in convs.items():
        assert inits[f"{name}.weight_q"].dtype == np.int8
        assert np.array_equal(inits[f"{name}.bias_q"], conv.bias.numpy())  # int32 codes
        step = conv.input_scale.float() * conv.weight_scale.float()  # fp32 s_x * s_w
        assert np.array_equal(inits[f"{name}.bias_scale"], step.numpy())
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == len(convs) == 6 and not ops["Conv"] and not ops["FusedConv"]
    _assert_exact(int_model, path, batches)


@pytest.mark.parametrize("rec", ["w8a8", "w7a8", "w4g32_a8dyn", "w4g32", "w8"])
def test_gpt_recipes_pass_the_gate(tmp_path, rec):
    int_model, batches, model, path = _export("gpt", rec, tmp_path)
    onnx.checker.check_model(model, full_check=True)
    q_proj = int_model.blocks[0].attn.q_proj
    init = next(t for t in model.graph.initializer if t.name == "blocks.0.attn.q_proj.weight_q")
    dq = _weight_dq(model, "blocks.0.attn.q_proj")
    if "g32" in rec:  # int4 codes, blocks of 32 along the input dim of the (in, out) weight
        assert init.data_type == TensorProto.INT4
        assert (_attr(dq, "axis"), _attr(dq, "block_size")) == (0, 32)
        assert list(init.dims) == [64, 64] and len(init.raw_data) == 64 * 64 // 2
        shift = 0
    elif rec == "w8":  # weight-only: dequantized to a float MatMul, plain int8
        assert init.data_type == TensorProto.INT8 and _attr(dq, "axis") == 1
        shift = 0
    elif rec == "w7a8":  # the integer GEMM, codes within [-64, 64]: int8, exact on every CPU
        assert init.data_type == TensorProto.INT8 and _attr(dq, "axis") == 1
        shift = 0
    else:  # the integer GEMM, full-range codes: uint8 codes + 128, exact on every CPU
        assert init.data_type == TensorProto.UINT8 and _attr(dq, "axis") == 1
        shift = 128
    got = numpy_helper.to_array(init).astype(np.int16) - shift
    assert np.array_equal(got, q_proj.int_weight().T.numpy())
    dynamic = "dyn" in rec
    assert bool(_nodes(model, "ReduceMin")) == dynamic
    if dynamic:  # per-token blocked QuantizeLinear: one block per token
        assert _attr(_nodes(model, "QuantizeLinear")[0], "block_size") == 64
    _assert_exact(int_model, path, batches)


def test_per_tensor_weights_are_exact(tmp_path):
    int_model, batches, model, path = _export("gpt", "w8a8_per_tensor", tmp_path)
    assert _attr(_weight_dq(model, "blocks.0.mlp.up_proj"), "axis") is None
    _assert_exact(int_model, path, batches)


def test_onnx_parity_dict(tmp_path):
    int_model, batches, _, path = _export("gpt", "w7a8", tmp_path)
    result = onnx_parity(int_model, path, [(b,) for b in batches])
    assert result == {**result, "failures": []}
    assert result["failures"] == [] and result["top1"] == 1.0
    assert result["aligned"]["rel"] <= EXACT and 0 < result["exact_share"] <= 1
    assert {"max_abs", "rel", "min_cosine", "report"} <= set(result)


def test_hf_bert_and_dynamic_shapes(tmp_path):
    int_model, batches, _, path = _export("bert", "w8a8", tmp_path, input_names=["input_ids"])
    session = ort_session(path)
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    other = torch.randint(0, 100, (3, 9))  # another batch size and sequence length
    got = session.run(None, {"input_ids": other.numpy()})[0]
    want = int_model(other).last_hidden_state.detach().numpy()
    assert got.shape == (3, 9, 32) and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    _assert_exact(int_model, path, batches)


def test_target_avx2_refuses_full_range_weights_and_writes_nothing(tmp_path):
    int_model, batches = _converted("gpt", "w8a8")
    with pytest.raises(ValueError, match=r"target=avx2 needs int8 weight codes within \[-64, "
                       r"64\].*blocks\.0\.attn\.q_proj \(weight codes \[-1\d\d, 1\d\d\]\)"
                       r".*recipe=w7a8.*target=any"):
        export_onnx(int_model, (batches[0],), tmp_path / "m.onnx", target="avx2")
    assert list(tmp_path.iterdir()) == []
    int_model, batches, model, path = _export("gpt", "w7a8", tmp_path, target="avx2")
    init = next(t for t in model.graph.initializer if t.name == "blocks.0.attn.q_proj.weight_q")
    assert init.data_type == TensorProto.INT8  # 7-bit weights pass, on the u8s8 kernels
    _assert_exact(int_model, path, batches, target="avx2")


def test_emulation_matches_onnx_runtime_on_this_cpu(tmp_path):
    """int8 weights (target vnni) of a full-range w8a8 model: ONNX Runtime here computes what
    the emulation of this family computes, and the two families differ."""
    int_model, batches, _, path = _export("gpt", "w8a8", tmp_path, target="vnni")
    got = torch.from_numpy(ort_session(path).run(None, {"input_0": batches[0].numpy()})[0])
    exact = _outputs(int_model, batches[:1])[0]
    emulated = {}
    for family in FAMILIES:
        with emulate(int_model, family, "vnni") as n:
            emulated[family] = (n, _outputs(int_model, batches[:1])[0])
    assert emulated["vnni"] == (0, emulated["vnni"][1]) and torch.equal(emulated["vnni"][1], exact)
    assert emulated["avx2"][0] == 15 and (emulated["avx2"][1] - exact).abs().max() > 1e-2
    scale = exact.abs().max()
    assert (got - emulated[FAMILY][1]).abs().max() <= 1e-6 * scale, FAMILY
    assert (got - emulated[OTHER][1]).abs().max() > 1e-2 * scale, OTHER


def test_export_gate_refuses_a_file_this_cpu_would_not_compute_exactly(tmp_path):
    int_model, batches, _, path = _export("gpt", "w8a8", tmp_path, target="vnni")
    if FAMILY == "avx2":
        with pytest.raises(ParityError, match=r"target=vnni stores int8 weights, and ONNX "
                           r"Runtime on this CPU \(avx2 .*\) does not compute blocks\.0\.attn"
                           r"\.q_proj \(weight codes .*\) exactly; export with "
                           r"export\.onnx\.target=any"):
            gate_onnx(int_model, path, [(b,) for b in batches])
        assert not path.exists()
    else:
        assert gate_onnx(int_model, path, [(b,) for b in batches])["exact_on"] == ["vnni"]
    int_model, batches, _, path = _export("gpt", "w8a8", tmp_path)  # target any
    result = gate_onnx(int_model, path, [(b,) for b in batches])
    assert result["exact_on"] == ["vnni", "avx2"] and result["family"] == FAMILY


def test_seven_bit_weights_never_saturate_int16_pair_sums():
    a = torch.randint(0, 256, (64, 96))
    w7 = torch.randint(-64, 64, (96, 16))
    assert torch.equal(pair_saturated_matmul(a, w7), a @ w7)
    worst = torch.full((1, 2), 255)
    assert pair_saturated_matmul(worst, torch.full((2, 1), -64)).item() == -32640
    assert pair_saturated_matmul(worst, torch.full((2, 1), 127)).item() == 32767  # saturated
    results = {}
    for rec in ("w8a8", "w7a8"):
        int_model, batches = _converted("gpt", rec)
        with torch.no_grad():
            ref = int_model(batches[0])
            with emulate(int_model, "avx2", target="vnni") as n:
                results[rec] = (n, (int_model(batches[0]) - ref).abs().max().item())
    assert results["w7a8"] == (15, 0.0)  # every Linear, bit-identical
    assert results["w8a8"][1] > 1e-3  # full range: a CPU without VNNI would be off


def test_odd_layers_embedding_groups_conv_padding_narrow_and_4bit_grids(tmp_path):
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 64)
            self.conv = nn.Conv1d(64, 32, 3, padding=1, padding_mode="reflect")
            self.fc = nn.Linear(32, 16)

        def forward(self, idx):
            h = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)  # (B, T, 32)
            return self.fc(self.fc(h.relu()).repeat(1, 1, 2))  # fc called twice

    w4g = {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": False}
    rules = [
        {"match": {"types": ["Embedding"]}, "weight": w4g},
        {"match": {"types": ["Conv1d"]}, "weight": {"bits": 8, "narrow_range": True},
         "input": {"bits": 4, "symmetric": False}},
        {"match": {"types": ["Linear"]}, "weight": {"bits": 6, "granularity": "per_channel"},
         "input": {"bits": 8, "symmetric": True}, "output": {"bits": 8, "dynamic": True,
                                                               "granularity": "per_token"}},
    ]  # fmt: skip
    model = qat.prepare(Odd(), {"rules": rules})
    batches = [torch.randint(0, 50, (2, 12)) for _ in range(3)]
    qat.quant.calibrate(model, batches, 3)
    int_model = qat.convert(model.eval())
    path = export_onnx(int_model, (batches[0],), tmp_path / "odd.onnx")
    model_proto = onnx.load(path)
    onnx.checker.check_model(model_proto, full_check=True)
    assert {n.op_type for n in model_proto.graph.node} >= {"Pad", "Clip", "Conv", "Gather"}
    report = _assert_exact(int_model, path, batches)
    assert [t.calls for t in report.layers] == [3, 3, 6]  # fc's two calls told apart


def test_refuses_a_fake_quant_model_and_needs_onnx(tmp_path, monkeypatch):
    model = qat.prepare(nn.Sequential(nn.Linear(4, 2)), recipe("w8a8"))
    with pytest.raises(ValueError, match=r"call qat\.convert\(model\)"):
        export_onnx(model, (torch.randn(1, 4),), tmp_path / "m.onnx")
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError("no onnx")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ImportError, match=r"pip install qat\[onnx\]"):
        export_onnx(nn.Linear(4, 2), (torch.randn(1, 4),), tmp_path / "m.onnx")
