"""Post-processing of the exported ONNX graph (pure `onnx` protobuf edits).

- `remove_taps`: the tap markers go; the tensors they marked are recorded by name, so
  the parity gate can read a layer's input and output back from ONNX Runtime.
- `restore_initializers`: the TorchScript exporter merges equal-valued initializers behind
  `Identity` nodes; small ones get their own named copy back (readable, per-layer qparams).
- `share_quantizers`: one QuantizeLinear per tensor and quantization grid.
- `to_int4`: group-wise 4-bit weights are exported as int8 codes and become INT4/UINT4 here
  (ONNX packs two per byte, element `2i` in the low nibble, as `qat.export.integer.packing` does).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from qat.export.integer.packing import pack_int4

TAP_ATTR = "qat_tap"
TAPS_KEY = "qat.taps"
INPUTS_KEY = "qat.input_names"


def _onnx() -> Any:
    import onnx

    return onnx


def _tap_key(node: Any) -> str | None:
    if node.op_type != "Identity":
        return None
    return next((a.s.decode() for a in node.attribute if a.name == TAP_ATTR), None)


def remove_taps(model: Any) -> dict[str, str]:
    """Drop the tap markers (`Identity` with a `qat_tap` attribute); return
    `{tap key: tensor name}`. A tap that produces a graph output stays a plain `Identity`."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    taps: dict[str, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        key = _tap_key(node)
        if key is None:
            keep.append(node)
            continue
        src = rename.get(node.input[0], node.input[0])
        if node.output[0] in outputs:
            del node.attribute[:]
            node.input[0] = src
            keep.append(node)
        else:
            rename[node.output[0]] = src
        taps[key] = src
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    stale = [v for v in graph.value_info if v.name in rename]
    for v in stale:
        graph.value_info.remove(v)
    return taps


def strip_prefix(model: Any, prefix: str) -> None:
    """Rename initializers `prefix.name` to `name`, node names and values `/prefix/...` to
    `/...` (and every reference to them): the exporter's wrapper module leaves no trace."""
    graph = model.graph
    scope = f"/{prefix}/"
    rename = {t.name: t.name[len(prefix) + 1:] for t in graph.initializer
              if t.name.startswith(f"{prefix}.")}  # fmt: skip
    for node in graph.node:
        node.name = node.name.replace(scope, "/", 1)
        for name in node.output:
            if name.startswith(scope):
                rename[name] = name.replace(scope, "/", 1)
            elif name.startswith(f"{prefix}."):  # the exporter's Identity of a merged initializer
                rename[name] = name[len(prefix) + 1 :]
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]
    for v in [*graph.value_info, *graph.input, *graph.output]:
        v.name = rename.get(v.name, v.name)


def restore_initializers(model: Any, max_elements: int = 4096) -> None:
    """Replace `Identity(initializer)` with a copy of the initializer when it is small."""
    onnx = _onnx()
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        src = inits.get(node.input[0]) if node.op_type == "Identity" and node.input else None
        if src is not None and int(np.prod(src.dims)) <= max_elements:
            copy = onnx.TensorProto()
            copy.CopyFrom(src)
            copy.name = node.output[0]
            graph.initializer.append(copy)
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def share_quantizers(model: Any) -> dict[str, str]:
    """Merge QuantizeLinear (and DequantizeLinear) nodes that quantize the same tensor with
    equal scale and zero point (q/k/v projections observe the same input): one pass instead
    of three. Returns `{removed output: the output that replaces it}`."""
    from onnx import numpy_helper

    graph = model.graph
    values = {t.name: (t.data_type, numpy_helper.to_array(t).tobytes(), tuple(t.dims))
              for t in graph.initializer}  # fmt: skip
    outputs = {o.name for o in graph.output}
    seen: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.output[0] in outputs:
            keep.append(node)
            continue
        key = (node.op_type, node.input[0], *(values.get(n, n) for n in node.input[1:]),
               *(a.SerializeToString() for a in node.attribute))  # fmt: skip
        if key in seen:
            rename[node.output[0]] = seen[key]
        else:
            seen[key] = node.output[0]
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return rename


def to_int4(model: Any, names: list[str]) -> None:
    """Turn the int8/uint8 initializers `names` (4-bit codes) into INT4/UINT4 initializers."""
    onnx = _onnx()
    from onnx import numpy_helper

    graph = model.graph
    for i, t in enumerate(graph.initializer):
        if t.name not in names:
            continue
        arr = numpy_helper.to_array(t)
        dtype = onnx.TensorProto.INT4 if arr.dtype == np.int8 else onnx.TensorProto.UINT4
        packed = pack_int4(torch.from_numpy(arr.astype(np.int16).ravel())).numpy()
        new = onnx.helper.make_tensor(t.name, dtype, arr.shape, packed.tobytes(), raw=True)
        graph.initializer[i].CopyFrom(new)
    stale = [v for v in graph.value_info if v.name in names]  # int8 type annotations
    for v in stale:
        graph.value_info.remove(v)


def set_metadata(model: Any, entries: dict[str, Any]) -> None:
    """Store `entries` as JSON in the model's `metadata_props` (replacing equal keys)."""
    props = {**_props(model), **{k: json.dumps(v) for k, v in entries.items()}}
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _props(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def metadata(model: Any, key: str) -> Any:
    """A JSON metadata entry written by `set_metadata` (None if absent)."""
    value = _props(model).get(key)
    return None if value is None else json.loads(value)


def with_outputs(model: Any, names: list[str]) -> Any:
    """A copy of `model` that also outputs the tensors `names` (type left to the runtime)."""
    onnx = _onnx()
    debug = onnx.ModelProto()
    debug.CopyFrom(model)
    have = {o.name for o in debug.graph.output}
    for name in names:
        if name not in have:
            debug.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    return debug
