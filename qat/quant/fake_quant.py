"""`FakeQuantizer`: quantize-dequantize with straight-through gradients (STE, LSQ, LSQ+, PACT)."""

from __future__ import annotations

import math

import torch
from torch import nn

from qat.quant import grid
from qat.quant.observers import build_observer
from qat.quant.spec import QuantSpec


class _FakeQuant(torch.autograd.Function):
    """`(clamp(round(x / s) + z, qmin, qmax) - z) * s` on a `(*P, R)` view in one fused pass.

    Gradients: clipped STE for `x` (1 where the unclamped code lies in `[qmin, qmax]`, clamp
    boundaries included); for a learned scale, LSQ's `round(x/s) - x/s` inside and `q - z`
    outside (`mode="lsq"`) or the outside term alone (`mode="pact"`), times `grad_factor`;
    for a learned zero point, `-s` outside.
    """

    @staticmethod
    def forward(ctx, v, scale, zp, qmin, qmax, mode, grad_factor):  # noqa: D102
        s = scale[..., None]
        xs = v / s
        r = torch.round(xs)
        if zp is None:
            out = r.clamp(qmin, qmax)
        elif zp.numel() == 1 and zp.device.type == "cpu" and zp.dtype == r.dtype:
            # One zero point (same dtype, so the result's dtype is what the tensor path gives):
            # scalar bounds. clamp(r + z, qmin, qmax) - z == clamp(r, qmin - z, qmax - z).
            z = zp.item()
            out = r.clamp(qmin - z, qmax - z)
        else:  # maximum + minimum: clamp with tensor bounds is ~3x slower than both on CPU
            z = zp[..., None]
            out = torch.maximum(r, qmin - z)
            out = torch.minimum(out, qmax - z, out=out)
        # Float mask written over `r` in one pass (a bool mask, or converting one, is several
        # times slower on CPU): 1.0 where rounding was not clamped, 0.0 where it was (and for
        # NaN inputs, which observers refuse and the NaN-loss check reports).
        mask = torch.eq(r, out, out=r)
        ds = None
        if mode != "ste" and ctx.needs_input_grad[1]:
            # LSQ: round(x/s) - x/s inside (= out - x/s there), q - z outside; PACT: q - z outside.
            ds = (torch.addcmul(out, xs, mask, value=-1.0) if mode == "lsq"
                  else torch.addcmul(out, out, mask, value=-1.0))
        ctx.grad_factor = grad_factor
        ctx.save_for_backward(mask, ds, scale)
        return out.mul_(s)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        mask, ds, scale = ctx.saved_tensors
        gx = g * mask if ctx.needs_input_grad[0] else None
        gs = gz = None
        if ds is not None:
            gs = _rowdot(g, ds) * ctx.grad_factor
        if ctx.needs_input_grad[2]:
            gz = (_rowdot(g, mask) - g.sum(-1)) * scale * ctx.grad_factor
        return gx, gs, gz, None, None, None, None


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(a * b).sum(-1)`, by whichever kernel measured fastest for the shape on CPU.

    The kernels sum in different orders (gradients agree to fp32 rounding); half precision
    always takes `einsum`, which accumulates in fp32.
    """
    if a.dim() == 1:
        return torch.dot(a, b)
    if a.dtype in (torch.float32, torch.float64):
        if a.shape[:-1].numel() == 1:  # per tensor: one BLAS dot
            return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(a.shape[:-1])
        if a.numel() <= 1 << 22:  # small: multiply and sum beat einsum's batched matmul
            return torch.linalg.vecdot(a, b)
    return torch.einsum("...r,...r->...", a, b)  # large: BLAS, no full-size temporary


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    mode: str = "ste",
    grad_factor: float | None = 1.0,
) -> torch.Tensor:
    """Functional fake quant of `x` with scales of `grid.param_shape(spec, x.shape)`.

    `grad_factor=None` with `mode="lsq"`: LSQ's `1 / sqrt(R * qmax)`, R the row length.
    """
    v = grid.to_view(x, spec)
    if grad_factor is None:
        grad_factor = 1.0 / math.sqrt(v.shape[-1] * spec.qmax) if mode == "lsq" else 1.0
    out = _FakeQuant.apply(v, scale, zero_point, spec.qmin, spec.qmax, mode, grad_factor)
    return grid.from_view(out, spec, x.shape)


def _ste(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`target` in the forward pass, gradient of identity to `value`."""
    return value + (target - value).detach()


class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor (a weight or an activation) under a `QuantSpec`.

    Three switches live in `state_dict` with the scales and observer statistics:
    `observer_enabled`, `fake_quant_enabled`, `calibrated`. While calibrating (observer on, fake
    quant off) it observes and passes `x` through. Observers update in training mode only, so
    validation data never moves a scale (`qat.quant.calibrate` observes with BN in eval mode).
    A learned scale (LSQ, LSQ+, PACT) is set from the observer only until fake quant starts;
    from then on the optimizer owns it.

    Example:
        >>> fq = FakeQuantizer(QuantSpec(bits=4, learn="lsq"), role="input")
        >>> _ = fq(torch.randn(16, 8))      # calibrates, fake quant on by default
        >>> fq(torch.zeros(2)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        spec: QuantSpec,
        role: str = "input",
        shape: tuple[int, ...] | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        spec.check_role(role)
        self.spec, self.role, self.name = spec, role, name
        # Monitoring (not state): when `track_stats` is set, forward records the share of
        # elements clipped to the grid's ends in `last_clip_fraction`.
        self.track_stats = False
        self.last_clip_fraction: float | None = None
        if spec.granularity != "per_tensor" and not spec.dynamic:
            if shape is None:
                raise ValueError(f"{spec.path}: {spec.granularity} needs the tensor's shape")
            spec.check_shape(tuple(shape))
        self.tensor_shape = tuple(shape) if shape is not None else None
        pshape = () if spec.dynamic else grid.param_shape(spec, tuple(shape or ()))
        self.register_buffer("fake_quant_enabled", torch.tensor(True))
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("calibrated", torch.tensor(False))
        if spec.dynamic:
            self.observer = None
            return
        self.observer = build_observer(spec, pshape, role, name=name)
        scale = torch.ones(pshape)
        if spec.learn == "pact":
            self.clip = nn.Parameter(scale * self._pact_levels())
        elif spec.learn in ("lsq", "lsq_plus"):
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        zp = torch.full(pshape, float(spec.qmin if not spec.symmetric else 0))
        if spec.learn == "lsq_plus":
            self.zero_point = nn.Parameter(zp)
        else:
            self.register_buffer("zero_point", zp)

    def _pact_levels(self) -> float:
        q = self.spec
        return (q.qmax - q.qmin) / 2 if q.symmetric else float(q.qmax - q.qmin)

    @property
    def learned(self) -> bool:
        return self.spec.learn != "none"

    def takes_observations(self) -> bool:
        """Whether a forward now updates the observer, when it is enabled: in training mode
        only (validation batches must not move scales), and a learned scale only until it is
        calibrated and fake quant is on (then the optimizer owns it)."""
        owned_by_optimizer = self.learned and self.fake_quant_enabled and self.calibrated
        return self.training and not bool(owned_by_optimizer)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the observer and the scales from `x` (no fake quant)."""
        self.observer(x)
        scale, zp = self.observer.qparams()
        if self.spec.learn == "pact":
            # PACT clips at the observed range: [-a, a] symmetric, [0, a] otherwise.
            amax = self.observer.max_val.clamp(min=0)
            if self.spec.symmetric:
                amax = torch.maximum(amax, -self.observer.min_val)
            levels = self._pact_levels()
            self.clip.copy_(grid.finalize_scale(amax / levels, self.spec) * levels)
        else:
            self.scale.copy_(scale)
            self.zero_point.copy_(zp)
        self.calibrated.fill_(True)

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Fix the scale and zero point from outside (GPTQ chose codes on them): marked
        calibrated, observer off, so neither calibration nor an observer moves them; a learned
        scale starts from `scale`."""
        if self.spec.dynamic:
            raise ValueError(f"{self.name or '?'}: a dynamic quantizer has no stored scale")
        scale = grid.finalize_scale(scale.float(), self.spec).reshape(self.zero_point.shape)
        if self.spec.learn == "pact":
            self.clip.copy_(scale * self._pact_levels())
        else:
            self.scale.copy_(scale)
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.calibrated.fill_(True)
        self.observer_enabled.fill_(False)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and integer zero point the forward pass uses (fp32), with gradients."""
        spec = self.spec
        if spec.learn == "pact":
            s = self.clip.abs().clamp(min=grid.FP32_EPS) / self._pact_levels()
        else:
            # A learned scale is used by magnitude: an optimizer step can carry the parameter
            # below zero (Adam moves it ~lr per step whatever the gradient's size, and an int8
            # weight scale is ~5e-3). Clamping at eps would pass no gradient back and leave the
            # channel quantized to zero for good; |s| keeps it working and learning.
            s = self.scale.abs().clamp(min=grid.FP32_EPS) if self.learned else self.scale
        if spec.scale_dtype == "fp16" and self.learned:
            s = _ste(s, grid.finalize_scale(s.detach(), spec))
        zp = self.zero_point
        if spec.learn == "lsq_plus":
            zp = _ste(zp, zp.detach().round().clamp(spec.qmin, spec.qmax))
        return s, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.dynamic:
            if not self.fake_quant_enabled:
                return x
            if spec.arithmetic == "llama_cpp":  # codes from the fp32 range: see grid
                q, s, z = grid.dynamic_quantize(x, spec)
                return _ste(x, grid.dequantize(q, s, z, spec).to(x.dtype))
            s, z = grid.dynamic_qparams(x, spec)
            return fake_quantize(x, s, None if spec.symmetric else z, spec)
        if self.observer_enabled and self.takes_observations():
            self.observe(x)
        if not self.fake_quant_enabled:
            return x
        if not self.calibrated:
            raise RuntimeError(
                f"quantizer {self.name or '?'} ({self.role}) has never observed data: run "
                "calibration first (qat.quant.calibrate, or training steps with observers on; "
                "observers update in training mode only)"
            )
        s, zp = self.qparams()
        if spec.learn == "pact":
            mode, factor = "pact", 1.0
        elif self.learned:
            mode, factor = "lsq", None  # 1 / sqrt(R * qmax), R the row length
        else:
            mode, factor = "ste", 1.0
        use_zp = zp if (not spec.symmetric or spec.learn == "lsq_plus") else None
        if self.track_stats:
            self._record_clip_fraction(x.detach(), s.detach(), zp.detach())
        return fake_quantize(x, s.to(x.dtype), use_zp, spec, mode, factor)

    @torch.no_grad()
    def _record_clip_fraction(self, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor) -> None:
        v = grid.to_view(x, self.spec)
        q = torch.round(v / s[..., None]) + zp[..., None]
        clipped = (q < self.spec.qmin) | (q > self.spec.qmax)
        self.last_clip_fraction = clipped.float().mean().item()

    def extra_repr(self) -> str:
        flags = [
            f"fq={'on' if self.fake_quant_enabled else 'off'}",
            f"obs={'on' if self.observer_enabled else 'off'}",
            f"calibrated={'yes' if self.calibrated else 'no'}",
        ]
        return f"{self.role}: {self.spec.describe()}, " + " ".join(flags)
