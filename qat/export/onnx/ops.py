"""ONNX node builders for the integer layers (TorchScript `symbolic` context, opset 21).

Every builder mirrors one piece of the numerics contract (`qat.quant.grid`) with ONNX ops whose
IEEE semantics are the same as torch's: QuantizeLinear divides by the scale and rounds half to
even (checked against ONNX Runtime), so the codes ONNX computes are the codes the integer
executor computes for the same fp32 input.
"""

from __future__ import annotations

from typing import Any

import torch

from qat.quant.grid import FP16_TINY, FP32_EPS, RANGE_CAP
from qat.quant.spec import QuantSpec

# ONNX TensorProto data types used below.
FLOAT, UINT8, INT8, FLOAT16 = 1, 2, 3, 10

Graph = Any  # torch._C.Graph wrapped by the exporter (GraphContext)
Value = Any  # torch._C.Value


def const(g: Graph, value: Any, dtype: torch.dtype = torch.float32) -> Value:
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def tap(g: Graph, x: Value, key: str) -> Value:
    """A marker (Identity with a `qat_tap` attribute) removed after export, its input recorded
    as tensor `key`. Identity, so shape inference sees through it while exporting."""
    return g.op("Identity", x, qat_tap_s=key)  # the attribute name is onnx_graph.TAP_ATTR


def container_range(spec: QuantSpec) -> tuple[int, int]:
    """The range of the 8-bit ONNX type that holds `spec`'s codes."""
    return (-128, 127) if spec.symmetric else (0, 255)


def last_dim(x: Value) -> int:
    sizes = x.type().sizes()
    if not sizes or sizes[-1] is None:
        raise ValueError("per-token quantization needs a static size of the last dimension")
    return int(sizes[-1])


def writes_dynamic(spec: QuantSpec) -> bool:
    """Whether ONNX ops compute dynamic `spec`'s codes as `grid` does: one scale per token or
    per tensor (QuantizeLinear's blocks), `arithmetic: exact` (it divides by the scale)."""
    return spec.granularity in ("per_token", "per_tensor") and spec.arithmetic == "exact"


def dynamic_qparams(g: Graph, x: Value, spec: QuantSpec) -> tuple[Value, Value]:
    """`grid.dynamic_qparams` as ONNX ops: per token (shape `(*lead, 1)`) or per tensor."""
    if not writes_dynamic(spec):
        raise ValueError(f"{spec.path}: ONNX export quantizes dynamic activations per token or "
                         f"per tensor with exact arithmetic, not {spec.describe()}; export this "
                         "recipe to gguf, or use granularity: per_token")  # fmt: skip
    if spec.granularity == "per_token":
        axes = const(g, [-1], torch.int64)
        mn = g.op("ReduceMin", x, axes, keepdims_i=1)  # (*lead, 1)
        mx = g.op("ReduceMax", x, axes, keepdims_i=1)
    else:
        mn = g.op("ReduceMin", x, keepdims_i=0)  # ()
        mx = g.op("ReduceMax", x, keepdims_i=0)
    qmin, qmax = spec.qrange
    min_neg = g.op("Clip", mn, const(g, -RANGE_CAP), const(g, 0.0))
    max_pos = g.op("Clip", mx, const(g, 0.0), const(g, RANGE_CAP))
    if spec.symmetric:
        amax = g.op("Max", g.op("Neg", min_neg), max_pos)
        raw = g.op("Div", amax, const(g, (qmax - qmin) / 2))
    else:
        raw = g.op("Div", g.op("Sub", max_pos, min_neg), const(g, float(qmax - qmin)))
    if spec.scale_dtype == "fp16":
        clipped = g.op("Clip", raw, const(g, FP16_TINY), const(g, 65504.0))
        scale = g.op("Cast", g.op("Cast", clipped, to_i=FLOAT16), to_i=FLOAT)
    else:
        scale = g.op("Max", raw, const(g, FP32_EPS))
    if spec.symmetric:
        return scale, g.op("Cast", g.op("Mul", scale, const(g, 0.0)), to_i=INT8)
    shift = g.op("Round", g.op("Div", min_neg, scale))
    zp = g.op("Clip", g.op("Sub", const(g, float(qmin)), shift), const(g, float(qmin)),
              const(g, float(qmax)))  # fmt: skip
    return scale, g.op("Cast", zp, to_i=UINT8)


def _clip_to_grid(
    g: Graph, x: Value, spec: QuantSpec, scale: Value, zp: Value, static: Any
) -> Value:
    """Clip `x` to the grid's float range when the grid is narrower than its 8-bit container.

    `round(clip(x, (qmin - z) s, (qmax - z) s) / s) + z` equals `clamp(round(x / s) + z)`: the
    clipped bounds divide back to within an ulp of `qmin - z` / `qmax - z`, which round exactly.
    """
    qmin, qmax = spec.qrange
    if (qmin, qmax) == container_range(spec):
        return x
    if static is not None:
        s, z = static
        lo, hi = (qmin - z) * s, (qmax - z) * s  # fp32, as the bounds are evaluated below
        return g.op("Clip", x, g.op("Constant", value_t=lo), g.op("Constant", value_t=hi))
    zf = g.op("Cast", zp, to_i=FLOAT)
    lo = g.op("Mul", g.op("Sub", const(g, float(qmin)), zf), scale)
    hi = g.op("Mul", g.op("Sub", const(g, float(qmax)), zf), scale)
    return g.op("Min", g.op("Max", x, lo), hi)


def fake_quant(
    g: Graph,
    x: Value,
    spec: QuantSpec,
    scale: Value | None = None,
    zp: Value | None = None,
    static: tuple[torch.Tensor, torch.Tensor] | None = None,
    dim: int | None = None,
) -> Value:
    """QuantizeLinear -> DequantizeLinear of activation `x` (static, or dynamic per call).

    Static quantizers pass their initializers `scale`/`zp` and, for grids narrower than 8 bits,
    their values `static` (for the clip bounds). Dynamic per-token ones use opset 21 blocked
    quantization with one block per token: `dim` (the last dim's size) when the layer knows it.
    """
    kw: dict[str, int] = {}
    if spec.dynamic:
        scale, zp = dynamic_qparams(g, x, spec)
        if spec.granularity == "per_token":
            kw = {"axis_i": -1, "block_size_i": dim or last_dim(x)}
    x = _clip_to_grid(g, x, spec, scale, zp, static)
    q = g.op("QuantizeLinear", x, scale, zp, **kw)
    return g.op("DequantizeLinear", q, scale, zp, **kw)


def dequant_weight(
    g: Graph,
    codes: Value,
    scale: Value,
    zp: Value | None,
    axis: int | None,
    block_size: int | None,
) -> Value:
    """DequantizeLinear of an integer weight initializer: per tensor, per axis, or blocked."""
    kw: dict[str, int] = {}
    if axis is not None:
        kw["axis_i"] = axis
    if block_size is not None:
        kw["block_size_i"] = block_size
    args = (codes, scale) if zp is None else (codes, scale, zp)
    return g.op("DequantizeLinear", *args, **kw)
