"""ONNX export of a converted (integer) model in QDQ form, and ONNX Runtime sessions for it.

Each integer layer becomes QuantizeLinear/DequantizeLinear nodes around the float op, with the
weights stored as integer initializers (never float weights behind a QuantizeLinear):

- int8/uint8 codes (up to 8 bits), DequantizeLinear per tensor or per axis (`axis` = the
  quantized channel; Linear weights are stored `(in, out)` for MatMul, so axis 1);
- 4-bit group-wise weights as INT4/UINT4 with opset 21 blocked DequantizeLinear
  (`block_size` = the group size, blocks along the input dimension);
- static activations: QuantizeLinear -> DequantizeLinear with the trained scale/zero point;
- dynamic activations: ReduceMin/ReduceMax -> scale and zero point exactly as
  `grid.dynamic_qparams` computes them -> blocked QuantizeLinear/DequantizeLinear (one block
  per token) -- DynamicQuantizeLinear is per tensor only;
- grids narrower than their 8-bit container (4-bit activations, narrow range) clip first.

ONNX Runtime fuses DQ -> MatMul -> (Add) into integer kernels (MatMulIntegerToFloat) and
blocked int4 DQ -> MatMul into MatMulNBits. Its QuantizeLinear divides and rounds half to even,
so its codes are the executor's codes for the same fp32 input. Two things to know:

- MatMulNBits defaults to `accuracy_level=4` (it re-quantizes activations to int8 per block:
  ~0.5% error). `ort_session` sets `session.qdq_matmulnbits_accuracy_level=0`; do the same in
  your own sessions for int4 models.
- The integer GEMM differs between x86 CPUs with and without VNNI for int8 weights; `target`
  picks the weight encoding (`any`, the default, is exact on every CPU: see `cpu`).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.export.integer.layer import IntLayer
from qat.export.onnx import cpu
from qat.export.onnx import graph as onnx_graph
from qat.export.onnx.layers import OnnxLayer
from qat.io import atomic_write
from qat.quant.family import Families
from qat.quant.modules import QATMixin
from qat.quant.provenance import provenance

OPSET = 21
TARGET_KEY = "qat.target"


def require_onnx() -> tuple[Any, Any]:
    """`(onnx, onnxruntime)`, or an ImportError that says how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "ONNX export needs `onnx` and `onnxruntime`; install them with "
            "`pip install qat[onnx]` (or `pip install onnx onnxruntime`)"
        ) from err
    return onnx, onnxruntime


def ort_session(
    model: str | Path | bytes | Any,
    threads: int | None = None,
    integer_kernels: bool = True,
    config: dict[str, str] | None = None,
) -> Any:
    """An ONNX Runtime CPU session with full graph optimization and exact int4 MatMulNBits.

    `model` is a path, serialized bytes or a `ModelProto`; `threads` sets intra-op threads.
    `integer_kernels=False` sets `session.disable_quant_qdq`: ONNX Runtime then runs Q/DQ as
    plain ops, dequantizes constant weights once at load and uses its fp32 kernels (the same
    activation codes; faster for small conv nets, whose QDQ Conv cannot use the NCHWc path).
    `config` adds session config entries (e.g. `{"session.intra_op.allow_spinning": "0"}`).
    """
    _, ort = require_onnx()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if not integer_kernels:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if threads is not None:
        so.intra_op_num_threads = threads
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = str(model)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _flat_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [("output", out)]
    if hasattr(out, "items"):  # transformers ModelOutput (None fields dropped, as when traced)
        return [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [(f"output_{i}", v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    raise TypeError(f"cannot export a model output of type {type(out).__name__}")


def _axes(inputs: tuple, outputs: list, names: list[str], out_names: list[str]) -> dict:
    """Batch is dim 0 everywhere; 2-D integer inputs (tokens, masks) have a sequence dim 1,
    and so do outputs of 3 or more dims when some input has one."""
    axes: dict[str, dict[int, str]] = {}
    seq = False
    for name, x in zip(names, inputs, strict=False):
        axes[name] = {0: "batch"}
        if x.ndim == 2 and not x.is_floating_point():
            axes[name][1] = "sequence"
            seq = True
    for name, (_, y) in zip(out_names, outputs, strict=True):
        axes[name] = {0: "batch", 1: "sequence"} if seq and y.ndim >= 3 else {0: "batch"}
    return axes


ROOT = "qat_root"


class _Positional(nn.Module):
    """`model(*args)` behind a `*args` signature: the TorchScript exporter would otherwise fill
    the optional parameters of e.g. transformers' `forward` positionally (and clash with
    keyword arguments their decorators add)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, ROOT, model)

    def forward(self, *args: torch.Tensor) -> Any:
        return getattr(self, ROOT)(*args)


@contextlib.contextmanager
def _swapped(
    root: _Positional, target: str, families: Families
) -> Iterator[dict[str, OnnxLayer]]:
    """Every `IntLayer` under `root` replaced by its `OnnxLayer`, at every path that holds it
    (a layer shared by two parents is one layer); restored afterwards. Names are relative to
    the integer model (the root's child)."""
    paths = [(n, m) for n, m in root.named_modules(remove_duplicate=False)
             if isinstance(m, IntLayer)]  # fmt: skip
    wrappers: dict[int, OnnxLayer] = {}
    for path, m in paths:
        if id(m) not in wrappers:
            name = path.removeprefix(ROOT).removeprefix(".")
            emit = families.of_int(m).onnx
            if emit is None:
                raise ValueError(f"{name}: the layer family of {type(m).__name__} has no ONNX "
                                 "form; export this model with formats=[qat] only")  # fmt: skip
            wrappers[id(m)] = OnnxLayer(m, name, cpu.shifted_weights(m, target), emit)

    def put(path: str, mod: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(root.get_submodule(parent), child, mod)

    try:
        for path, m in paths:
            put(path, wrappers[id(m)])
        yield {w.name: w for w in wrappers.values()}
    finally:
        for path, m in paths:
            put(path, m)


@torch.no_grad()
def export_onnx(
    int_model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str] | None = None,
    dynamic_axes: bool | dict[str, dict[int, str]] = True,
    target: str = "any",
) -> Path:
    """Write `int_model` (from `qat.convert`) to `path` as a QDQ ONNX model; return the path.

    `example_inputs` are traced once (`int_model(*example_inputs)`); `input_names` default to
    `input_0, ...`. `dynamic_axes=True` makes dim 0 (batch) of every input and output dynamic,
    and dim 1 of 2-D integer inputs (token ids, masks) and of outputs with 3+ dims; a dict
    gives the axes explicitly. `target` (`any`, `vnni`, `avx2`: see `qat.export.onnx.cpu`)
    picks the weight encoding of integer-GEMM layers; `any` is exact on every CPU, `avx2`
    refuses weights that CPUs without VNNI would not compute exactly. The file is written to a
    temp file and renamed, and passes `onnx.checker.check_model`. Its metadata holds
    `qat.taps` (where each layer's quantizer inputs and output are, for the parity gate),
    `qat.input_names` and `qat.target`. Gate it with
    `qat.export.onnx.parity.onnx_parity_report(int_model, path, batches).check()`.

    Example:
        >>> import qat, tempfile
        >>> m = qat.prepare(nn.Sequential(nn.Linear(8, 4)), {"rules": [
        ...     {"match": {"types": ["Linear"]}, "weight": {"bits": 8}, "input": {"bits": 8}}]})
        >>> _ = m(torch.randn(16, 8))
        >>> int_model = qat.convert(m)
        >>> path = export_onnx(int_model, (torch.randn(2, 8),), tempfile.mkdtemp() + "/m.onnx")
        >>> out = ort_session(path).run(None, {"input_0": torch.randn(3, 8).numpy()})[0]
        >>> out.shape
        (3, 4)
    """
    onnx, _ = require_onnx()
    if any(isinstance(m, QATMixin) for m in int_model.modules()):
        raise ValueError(
            "export_onnx takes the integer model: call qat.convert(model) on the trained "
            "fake-quant model first"
        )
    cpu.check_weights_for(int_model, target)
    inputs = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    names = list(input_names or [f"input_{i}" for i in range(len(inputs))])
    families = provenance(int_model).families  # the integer layers' ONNX builders
    if families is None:
        raise ValueError("export_onnx takes the integer model that qat.convert or qat.load made "
                         "(its provenance names its layer families); for one built by hand, "
                         "record them: qat.quant.provenance.record(model, families=qat.shipped())")
    was_training = int_model.training
    int_model.eval()
    try:
        outputs = _flat_outputs(int_model(*inputs))
        out_names = [n for n, _ in outputs]
        axes = dynamic_axes
        if axes is True:
            axes = _axes(inputs, outputs, names, out_names)
        buf = io.BytesIO()
        root = _Positional(int_model)
        with _swapped(root, target, families) as wrappers, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-exporter and opset-21 notices
            torch.onnx.export(
                root, inputs, buf, dynamo=False, opset_version=OPSET,
                input_names=names, output_names=out_names, dynamic_axes=axes or None,
                do_constant_folding=True,
            )  # fmt: skip
            int4 = [f"{n}.{k}".lstrip(".") for n, w in wrappers.items() if w.int4
                    for k in ("weight_q", "weight_zero_point")]  # fmt: skip
    finally:
        int_model.train(was_training)
    model = onnx.load_from_string(buf.getvalue())
    onnx_graph.strip_prefix(model, ROOT)
    taps = onnx_graph.remove_taps(model)
    onnx_graph.restore_initializers(model)
    merged = onnx_graph.share_quantizers(model)
    taps = {key: merged.get(name, name) for key, name in taps.items()}
    onnx_graph.to_int4(model, int4)
    onnx_graph.set_metadata(model, {onnx_graph.TAPS_KEY: taps, onnx_graph.INPUTS_KEY: names,
                                    TARGET_KEY: target})  # fmt: skip
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    atomic_write(path, lambda f: f.write(model.SerializeToString()), "ONNX file")
    return path
