"""The numerics contract in one place: layouts, scale/zero-point rules, quantize/dequantize.

Every quantized tensor is viewed as `(*P, R)`: `P` is the shape of its scales (`()` per tensor,
`(C,)` per channel, `(rows, groups)` per group, `(*lead,)` per token, `(*lead, groups)` for
dynamic per-group activations, grouped along their last dim) and `R` the elements that share
one scale. Training, export and the integer executor all go through these functions.
"""

from __future__ import annotations

import torch

from qat.quant.spec import QuantSpec

FP32_EPS = torch.finfo(torch.float32).eps
RANGE_CAP = float(torch.finfo(torch.float32).max) / 4
# Smallest normal fp16: a smaller fp16 scale would be subnormal and lose precision.
FP16_TINY = float(torch.finfo(torch.float16).tiny)


def param_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale tensor for a tensor of `shape` under `spec` (static granularities)."""
    if spec.granularity == "per_tensor":
        return ()
    if spec.granularity == "per_channel":
        return (shape[spec.axis],)
    if spec.granularity == "per_group":
        cols = 1
        for s in shape[1:]:
            cols *= s
        return (shape[0], cols // spec.group_size)
    return tuple(shape[:-1])  # per_token


def to_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape `x` to `(*P, R)` (a view where the memory layout allows)."""
    g = spec.granularity
    if g == "per_tensor":
        return x.reshape(-1)
    if g == "per_channel":
        return x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
    if g == "per_group" and spec.dynamic:  # activations: groups along the last dim
        return x.reshape(*x.shape[:-1], -1, spec.group_size)
    if g == "per_group":
        return x.reshape(x.shape[0], -1, spec.group_size)
    return x  # per_token: the last dim is R already


def from_view(v: torch.Tensor, spec: QuantSpec, shape: torch.Size) -> torch.Tensor:
    """Inverse of `to_view`."""
    if spec.granularity == "per_channel" and spec.axis % len(shape) != 0:
        axis = spec.axis % len(shape)
        moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
        return v.reshape(moved).movedim(0, axis)
    return v.reshape(shape)


def finalize_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Floor at eps and, for `scale_dtype: fp16`, round to fp16 (training sees the stored value)."""
    if spec.scale_dtype == "fp16":
        return scale.clamp(min=FP16_TINY, max=65504.0).half().float()
    return scale.clamp(min=FP32_EPS)


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued, fp32) zero point from observed ranges, per the contract.

    Symmetric: `s = amax / ((qmax - qmin) / 2)`, `z = 0`. Asymmetric: the range is widened to
    include 0, `s = (max - min) / (qmax - qmin)`, `z = qmin - round(min / s)` clamped to the grid.
    """
    qmin, qmax = spec.qrange
    # Ranges are capped at +-fp32max/4 so that neither max - min nor any grid point
    # (q - z) * s can overflow to inf, whatever the zero point's rounding.
    min_neg = torch.clamp(min_val.float(), min=-RANGE_CAP, max=0.0)
    max_pos = torch.clamp(max_val.float(), min=0.0, max=RANGE_CAP)
    if spec.symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = finalize_scale(amax / ((qmax - qmin) / 2), spec)
        return scale, torch.zeros_like(scale)
    scale = finalize_scale((max_pos - min_neg) / (qmax - qmin), spec)
    zp = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    return scale, zp


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Integer codes (as an integer-valued float tensor) of `x`, same shape as `x`.

    `q = clamp(round_half_even(x / s) + z, qmin, qmax)`: division, not multiply by `1/s`, so
    ONNX QuantizeLinear gives the same integers.
    """
    v = to_view(x, spec)
    q = torch.round(v / scale[..., None]) + zero_point[..., None]
    return from_view(q.clamp_(spec.qmin, spec.qmax), spec, x.shape)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """`(q - z) * s` in fp32, same shape as `q`."""
    v = to_view(q.float(), spec)
    return from_view((v - zero_point[..., None]) * scale[..., None], spec, q.shape)


def dynamic_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-call min/max scales for dynamic quantization (per tensor, token or group).

    `arithmetic: llama_cpp` stores `fp16(amax / qmax)` unfloored, as llama.cpp's Q8_0 blocks do.
    """
    v = to_view(x.detach(), spec)
    if spec.arithmetic == "llama_cpp":
        return _llama_cpp_scale(v.abs().amax(-1).float(), spec)
    mn, mx = torch.aminmax(v, dim=-1)
    return qparams_from_range(mn, mx, spec)


def _llama_cpp_scale(amax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    s = (amax / spec.qmax).half().float()
    return s, torch.zeros_like(s)


def dynamic_quantize(
    x: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(codes, scale, zero_point)` of `x` under dynamic `spec`, scales from `x` itself.

    `arithmetic: llama_cpp`: `codes = round_half_even(x * (qmax / amax))` in fp32 (0 where
    `amax` is 0), as llama.cpp's AVX2/AVX-512 `quantize_row_q8_0`: the codes come from the fp32
    range, the stored scale is its fp16 rounding.

    Example:
        >>> spec = QuantSpec(bits=8, granularity="per_group", group_size=2, dynamic=True,
        ...                  narrow_range=True, scale_dtype="fp16", arithmetic="llama_cpp")
        >>> q, s, _ = dynamic_quantize(torch.tensor([[0.5, -1.0, 0.0, 0.0]]), spec)
        >>> q.tolist(), s.shape
        ([[64.0, -127.0, 0.0, 0.0]], torch.Size([1, 2]))
    """
    if spec.arithmetic != "llama_cpp":
        s, z = dynamic_qparams(x, spec)
        return quantize(x, s, z, spec), s, z
    v = to_view(x.detach().float(), spec)
    # One amax for both: this runs on every Linear input every step.
    amax = v.abs().amax(-1)
    s, z = _llama_cpp_scale(amax, spec)
    amax = amax[..., None]
    # a tensor divided by a tensor: torch takes `scalar / tensor` as `scalar * (1 / tensor)`,
    # an ulp off llama.cpp's fp32 division for a quarter of all amax values
    inv = torch.where(amax > 0, torch.full_like(amax, spec.qmax) / amax, torch.zeros_like(amax))
    q = torch.round(v * inv).clamp_(spec.qmin, spec.qmax)
    return from_view(q, spec, x.shape), s, z


# -- the bias grid: int32 codes in steps of s_x * s_w -------------------------------------------
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def bias_on_grid(weight: QuantSpec | None, input: QuantSpec | None) -> bool:  # noqa: A002
    """Whether a layer's bias is int32 in steps of `s_x * s_w`, as integer kernels add it
    (ONNX Runtime's QLinearConv, TFLite, accelerators): a static per-tensor input and one weight
    scale per output channel or tensor. Grouped weights or dynamic inputs keep a float bias.

    Example:
        >>> bias_on_grid(QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8))
        True
        >>> bias_on_grid(QuantSpec(bits=4, granularity="per_group", group_size=32), QuantSpec())
        False
    """
    return (
        weight is not None and input is not None and not input.dynamic
        and input.granularity == "per_tensor"
        and weight.granularity in ("per_tensor", "per_channel")
    )  # fmt: skip


def bias_scale(input_scale: torch.Tensor, weight_scale: torch.Tensor, n_out: int) -> torch.Tensor:
    """`s_x * s_w` in fp32, one per output channel (`(n_out,)`).

    A per-channel weight scale shorter than `n_out` (grouped transposed convolutions: one scale
    per channel within a group) repeats for each group.
    """
    s = (input_scale.detach().float().reshape(()) * weight_scale.detach().float()).reshape(-1)
    return s.expand(n_out) if s.numel() == 1 else s.repeat(n_out // s.numel())


def quantize_bias(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int32 codes of `bias` (int-valued float64): `clamp(round_half_even(b / s))`, divided in
    float64 so training and export agree to the code."""
    q = torch.round(bias.detach().double() / scale.double())
    return q.clamp_(INT32_MIN, INT32_MAX)


def dequantize_bias(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`codes * s` computed in float64, rounded once to `dtype`: the bias training adds."""
    return (codes.double() * scale.double()).to(dtype)
