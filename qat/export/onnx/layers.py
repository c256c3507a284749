"""Export-time stand-ins for the integer layers: `OnnxLayer` and its `symbolic`.

`OnnxLayer` wraps one `IntLayer` and holds the tensors ONNX needs as buffers, so they become
named initializers (`<layer>.weight_q`, `<layer>.weight_scale`, `<layer>.input_scale`, ...):
integer weight codes laid out for the ONNX op (Linear: `(in, out)` for MatMul), fp32 scales,
integer zero points. Its forward is `_IntOp.apply`, whose `forward` runs the integer executor
(so tracing sees the real outputs) and whose `symbolic` writes the QDQ nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qat.export.integer import IntEmbedding, IntLinear
from qat.export.integer.layer import IntLayer
from qat.export.onnx import ops
from qat.quant.spec import QuantSpec

ARGS = ("weight_q", "weight", "weight_scale", "weight_zero_point", "bias", "bias_q", "bias_scale",
        "input_scale", "input_zero_point", "output_scale", "output_zero_point")  # fmt: skip
# padding_mode -> ONNX Pad mode
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def int4_packed(spec: QuantSpec | None) -> bool:
    """Weights stored as ONNX INT4/UINT4: group-wise grids of at most 4 bits."""
    return spec is not None and spec.bits <= 4 and spec.granularity == "per_group"


def _act_tensors(layer: IntLayer, role: str) -> dict[str, torch.Tensor]:
    spec = getattr(layer, f"{role}_spec")
    if spec is None or spec.dynamic:
        return {}
    s = getattr(layer, f"{role}_scale").float().clone()
    if spec.symmetric:
        z = torch.zeros((), dtype=torch.int8)
    else:
        z = getattr(layer, f"{role}_zero_point").clone()
    return {f"{role}_scale": s, f"{role}_zero_point": z}


class OnnxLayer(nn.Module):
    """Stands in for `IntLayer` `layer` (module path `name`) while exporting to ONNX.

    `shift` stores symmetric weight codes as uint8 with zero point 128 (the same numbers, on
    ONNX Runtime's u8u8 kernels, which are exact on every CPU: see `cpu`).

    Example:
        >>> from qat.export import IntLinear
        >>> lin = IntLinear(4, 2, weight_spec=QuantSpec(bits=8, granularity="per_channel"))
        >>> onnx_lin = OnnxLayer(lin, "fc")
        >>> onnx_lin.weight_q.shape, onnx_lin.weight_q.dtype, onnx_lin.axis  # MatMul layout
        (torch.Size([4, 2]), torch.int8, 1)
    """

    def __init__(self, layer: IntLayer, name: str, shift: bool = False,
                 emit: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.layer, self.name, self.shift = layer, name, shift
        self.emit = emit  # the layer family's ONNX builder, see `_layer_graph`
        ws = layer.weight_spec
        self.axis: int | None = None
        self.block: int | None = None
        tensors: dict[str, torch.Tensor] = {}
        if ws is None:
            w = layer.float_weight.detach().clone()
            tensors["weight"] = w.T.contiguous() if isinstance(layer, IntLinear) else w
        else:
            tensors.update(self._weight(layer, ws))
        if layer.bias is not None:
            tensors.update(self._bias(layer))
        tensors.update(_act_tensors(layer, "input"))
        tensors.update(_act_tensors(layer, "output"))
        for key, t in tensors.items():
            self.register_buffer(key, t)
        self.arg_names = [k for k in ARGS if k in tensors]
        self.int4 = int4_packed(ws) and not isinstance(layer, IntEmbedding)
        self.calls = 0  # symbolic calls so far: a layer called twice has two taps per role

    def _weight(self, layer: IntLayer, ws: QuantSpec) -> dict[str, torch.Tensor]:
        codes = layer.int_weight().to(torch.int8 if ws.symmetric else torch.uint8)
        s, z = layer.weight_qparams()
        z = z.to(torch.uint8)
        g, nd = ws.granularity, codes.ndim
        if g == "per_channel":
            self.axis = ws.axis % nd
        elif g == "per_group":
            self.axis, self.block = 1, ws.group_size
            codes = codes.reshape(codes.shape[0], -1)  # (O, C*k...): groups run along dim 1
        if isinstance(layer, IntLinear):
            codes = codes.t()  # MatMul's (in, out) layout
            s, z = (s.t(), z.t()) if s.ndim == 2 else (s, z)
            self.axis = None if self.axis is None else 1 - self.axis
        if self.shift:  # q + 128 with zero point 128: (q + 128) - 128 = q
            codes = (codes.to(torch.int16) + 128).to(torch.uint8)
            z = torch.full_like(z, 128)
        out = {"weight_q": codes.contiguous(), "weight_scale": s.contiguous()}
        if not ws.symmetric or self.shift:
            out["weight_zero_point"] = z.contiguous()
        return out

    def _bias(self, layer: IntLayer) -> dict[str, torch.Tensor]:
        """Convolutions take int32 bias codes as their third input (`DequantizeLinear` at
        `s_x * s_w`, which ONNX Runtime fuses into QLinearConv); other layers add the float
        bias as training does."""
        n_dim = getattr(layer, "N_DIM", None)  # Conv1d/Conv2d: (O, 1, ...) over (B, O, ...)
        if n_dim is not None and layer.bias_grid:
            return {"bias_q": layer.bias.clone(), "bias_scale": layer.bias_scale().clone()}
        b = layer.float_bias().detach().float().clone()
        return {"bias": b if n_dim is None else b.reshape(-1, *[1] * n_dim)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _IntOp.apply(self, x, *[getattr(self, k) for k in self.arg_names])


class _IntOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, mod: OnnxLayer, x: torch.Tensor, *tensors: Any) -> torch.Tensor:
        # The tracer would record the executor's ops too: the symbolic replaces them anyway.
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return mod.layer(x)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g: Any, mod: OnnxLayer, x: Any, *tensors: Any) -> Any:
        call, mod.calls = mod.calls, mod.calls + 1
        t = dict.fromkeys(ARGS)
        t.update(zip(mod.arg_names, tensors, strict=True))
        return _layer_graph(g, mod, x, t, f"{mod.name}|{{}}|{call}")


def _act(g: Any, mod: OnnxLayer, x: Any, t: dict, role: str, key: str) -> Any:
    spec = getattr(mod.layer, f"{role}_spec")
    if spec is None:
        return x
    x = ops.tap(g, x, key.format(role))
    static = None
    if not spec.dynamic:
        static = (getattr(mod, f"{role}_scale"), getattr(mod, f"{role}_zero_point").float())
    s, z = t.get(f"{role}_scale"), t.get(f"{role}_zero_point")
    return ops.fake_quant(g, x, spec, s, z, static, _last_dim(mod.layer, role))


def _last_dim(layer: IntLayer, role: str) -> int | None:
    """Size of the last dim of the layer's `role` tensor, where the layer fixes it."""
    if isinstance(layer, IntLinear):
        return layer.in_features if role == "input" else layer.out_features
    if isinstance(layer, IntEmbedding):
        return layer.embedding_dim
    return None


def weight_graph(g: Any, mod: OnnxLayer, t: dict) -> Any:
    """The layer's weight as the op takes it: the float initializer, or DequantizeLinear."""
    if mod.layer.weight_spec is None:
        return t["weight"]
    w = ops.dequant_weight(g, t["weight_q"], t["weight_scale"], t["weight_zero_point"],
                           mod.axis, mod.block)  # fmt: skip
    shape = mod.layer.weight_shape
    if mod.block is not None and not isinstance(mod.layer, IntLinear) and len(shape) > 2:
        w = g.op("Reshape", w, ops.const(g, list(shape), torch.int64))
    return w


def _layer_graph(g: Any, mod: OnnxLayer, x: Any, t: dict, key: str) -> Any:
    """Input quantizer, the family's op, output quantizer, each marked for the parity gate."""
    y = mod.emit(g, mod, _act(g, mod, x, t, "input", key), t)
    y = _act(g, mod, y, t, "output", key)
    return ops.tap(g, y, key.format("out"))


def linear_graph(g: Any, mod: OnnxLayer, x: Any, t: dict) -> Any:
    """`IntLinear`: MatMul with the (in, out) weight, then the float bias."""
    y = g.op("MatMul", x, weight_graph(g, mod, t))
    return y if t["bias"] is None else g.op("Add", y, t["bias"])


def conv_graph(g: Any, mod: OnnxLayer, x: Any, t: dict) -> Any:
    """`IntConv1d`/`IntConv2d`: Pad for non-zero padding modes, Conv, then the float bias."""
    layer, w, bias = mod.layer, weight_graph(g, mod, t), t["bias"]
    inputs = [x, w, *_bias_input(g, t)]
    n = layer.N_DIM
    pad_twice = list(layer._pad_twice)  # F.pad order: (last_lo, last_hi, prev_lo, prev_hi, ...)
    lo = [pad_twice[2 * (n - 1 - i)] for i in range(n)]
    hi = [pad_twice[2 * (n - 1 - i) + 1] for i in range(n)]
    if layer.padding_mode != "zeros":
        if layer.padding_mode not in _PAD_MODES:  # pragma: no cover - torch has no others
            raise ValueError(f"{mod.name}: padding_mode {layer.padding_mode!r} has no ONNX Pad")
        pads = ops.const(g, [0, 0, *lo, 0, 0, *hi], torch.int64)
        inputs[0] = g.op("Pad", x, pads, mode_s=_PAD_MODES[layer.padding_mode])
        lo = hi = [0] * n
    y = g.op(
        "Conv", *inputs, kernel_shape_i=list(layer.kernel_size), strides_i=list(layer.stride),
        pads_i=lo + hi, dilations_i=list(layer.dilation), group_i=layer.groups,
    )  # fmt: skip
    # A float bias (no static input quantizer) stays a separate Add: given as Conv's input,
    # ONNX Runtime would round it to int32 steps of s_x * s_w (WeightBiasQuantization).
    return y if bias is None else g.op("Add", y, bias)


def _bias_input(g: Any, t: dict) -> list[Any]:
    """A convolution's third input: its int32 bias codes, dequantized at `s_x * s_w` (ONNX
    Runtime's QDQ fusions keep them as the integer kernel's bias); none for a float bias."""
    if t["bias_q"] is None:
        return []
    return [g.op("DequantizeLinear", t["bias_q"], t["bias_scale"], axis_i=0)]


def conv_transpose_graph(g: Any, mod: OnnxLayer, x: Any, t: dict) -> Any:
    """`IntConvTranspose2d`: ConvTranspose (weight dequantized along axis 1), then the bias."""
    layer = mod.layer
    y = g.op(
        "ConvTranspose", x, weight_graph(g, mod, t), *_bias_input(g, t),
        kernel_shape_i=list(layer.kernel_size),
        strides_i=list(layer.stride), pads_i=list(layer.padding) * 2,
        output_padding_i=list(layer.output_padding), dilations_i=list(layer.dilation),
        group_i=layer.groups,
    )  # fmt: skip
    return y if t["bias"] is None else g.op("Add", y, t["bias"])


def embedding_graph(g: Any, mod: OnnxLayer, idx: Any, t: dict) -> Any:
    """`IntEmbedding`: Gather code rows, then `(q - z) * s` with Cast/Sub/Mul (the executor's
    expression).

    Not DequantizeLinear: the scales of gathered rows vary per token (a blocked DQ would do,
    but ONNX Runtime runs it slowly and duplicates it for every consumer).
    """
    ws = mod.layer.weight_spec
    if ws is None:
        return g.op("Gather", t["weight"], idx)
    q = g.op("Cast", g.op("Gather", t["weight_q"], idx), to_i=ops.FLOAT)  # (*idx, D)
    s, z = t["weight_scale"], t["weight_zero_point"]
    z = None if z is None else g.op("Cast", z, to_i=ops.FLOAT)
    gran, d = ws.granularity, mod.layer.embedding_dim
    if gran == "per_tensor" or (gran == "per_channel" and mod.axis == 1):
        return g.op("Mul", q if z is None else g.op("Sub", q, z), s)  # s, z: () or (D,)
    axes = ops.const(g, [-1], torch.int64)
    s = g.op("Unsqueeze", g.op("Gather", s, idx), axes)  # (*idx, 1) or (*idx, G, 1)
    z = None if z is None else g.op("Unsqueeze", g.op("Gather", z, idx), axes)
    if gran != "per_group":
        return g.op("Mul", q if z is None else g.op("Sub", q, z), s)
    lead = g.op("Shape", idx)
    groups = ops.const(g, [d // ws.group_size, ws.group_size], torch.int64)
    q = g.op("Reshape", q, g.op("Concat", lead, groups, axis_i=0))  # (*idx, G, g)
    y = g.op("Mul", q if z is None else g.op("Sub", q, z), s)
    y = g.op("Reshape", y, g.op("Concat", lead, ops.const(g, [d], torch.int64), axis_i=0))
    return y
