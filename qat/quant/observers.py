"""Range estimators. Each keeps `min_val`/`max_val` of the scale's shape in its buffers.

Weights are observed afresh on each call (the weights move during training), except `ema`;
activations accumulate: `minmax` keeps the running extremes, `ema` a moving average, and
`percentile`/`mse` the mean of their per-batch estimates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from qat.quant import grid
from qat.quant.spec import QuantSpec

MSE_CANDIDATES = 40
# The MSE search measures its error on at most this many values per scale (a fixed random
# sample; the range itself always comes from every value): a search over every activation of
# a language model would cost minutes per calibration batch.
MSE_MAX_SAMPLES = 2**18


class NonFiniteInputError(ValueError):
    """An observer saw NaN or Inf: its scale would be meaningless."""


class Observer(nn.Module):
    """Base: reduce a `(*P, R)` view to per-scale `(min, max)` estimates and aggregate them.

    Example:
        >>> obs = Observer(QuantSpec(bits=8), shape=(), accumulate=True)
        >>> obs(torch.tensor([-1.0, 2.0])); obs(torch.tensor([3.0]))
        >>> obs.max_val.item()
        3.0
    """

    def __init__(
        self, spec: QuantSpec, shape: tuple[int, ...], accumulate: bool, name: str = ""
    ) -> None:
        super().__init__()
        self.spec = spec
        self.accumulate = accumulate
        self.name = name
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def estimate(
        self, v: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-scale range estimate from the view `v` and its exact per-scale min/max."""
        return mn, mx

    def combine(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate a new estimate with the stored one (count already includes the new one)."""
        return torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        v = grid.to_view(x.detach().float(), self.spec)
        mn, mx = torch.aminmax(v, dim=-1)
        # aminmax propagates NaN, so checking the extremes is checking every element.
        if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            bad = "NaN" if torch.isnan(mn).any() or torch.isnan(mx).any() else "Inf"
            raise NonFiniteInputError(
                f"observer {self.name or '?'} got {bad} input: its scale would be {bad}. "
                "Check the data and the loss (a diverged step), or lower the learning rate."
            )
        mn, mx = self.estimate(v, mn, mx)
        if self.accumulate:
            mn, mx = self._sync(mn, mx)
        self.count += 1
        if self.accumulate and self.count > 1:
            mn, mx = self.combine(mn, mx)
        self.min_val.copy_(mn)
        self.max_val.copy_(mx)

    def _sync(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Under torch.distributed, combine the ranks' estimates so every rank holds the same
        statistics (activations differ per rank; weights are identical under DDP)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return mn, mx
        mn, mx = mn.contiguous(), mx.contiguous()
        if type(self) is MinMaxObserver:
            dist.all_reduce(mn, op=dist.ReduceOp.MIN)
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        else:
            both = torch.stack([mn, mx])
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            mn, mx = both / dist.get_world_size()
        return mn, mx

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return grid.qparams_from_range(self.min_val, self.max_val, self.spec)

    def extra_repr(self) -> str:
        return f"accumulate={self.accumulate}"


class MinMaxObserver(Observer):
    """Running min and max (or the current tensor's, for weights)."""


class EMAObserver(Observer):
    """Exponential moving average of per-batch min and max: `m * old + (1 - m) * new`."""

    def combine(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.spec.momentum
        return m * self.min_val + (1 - m) * mn, m * self.max_val + (1 - m) * mx


class _MeanObserver(Observer):
    def combine(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.count.float()
        return self.min_val + (mn - self.min_val) / n, self.max_val + (mx - self.max_val) / n


class PercentileObserver(_MeanObserver):
    """The `percentile` of |x| (symmetric) or the lower/upper percentiles (asymmetric)."""

    def estimate(self, v, mn, mx):  # noqa: D102
        r = v.shape[-1]
        q = self.spec.percentile / 100.0
        k_hi = min(r, max(1, int(round(q * r))))
        if self.spec.symmetric:
            amax = torch.kthvalue(v.abs(), k_hi, dim=-1).values
            return -amax, amax
        k_lo = max(1, min(r, r - k_hi + 1))
        return torch.kthvalue(v, k_lo, dim=-1).values, torch.kthvalue(v, k_hi, dim=-1).values


class MSEObserver(_MeanObserver):
    """Clip ratio (per scale) in `[0.2, 1]` that minimizes the quantization MSE.

    `MSE_CANDIDATES` grids are tried per call; above `MSE_MAX_SAMPLES` values per scale the
    error is measured on a fixed random sample of them.
    """

    def estimate(self, v, mn, mx):  # noqa: D102
        r = v.shape[-1]
        if r > MSE_MAX_SAMPLES:  # fixed seed: the same sample every call, on any device
            gen = torch.Generator().manual_seed(0)
            v = v[..., torch.randint(r, (MSE_MAX_SAMPLES,), generator=gen).to(v.device)]
        best_err = torch.full_like(mn, float("inf"))
        best_mn, best_mx = mn.clone(), mx.clone()
        qmin, qmax = self.spec.qrange
        for i in range(MSE_CANDIDATES):
            ratio = 1.0 - 0.8 * i / MSE_CANDIDATES
            cmn, cmx = mn * ratio, mx * ratio
            s, z = grid.qparams_from_range(cmn, cmx, self.spec)
            q = (torch.round(v / s[..., None]) + z[..., None]).clamp_(qmin, qmax)
            err = ((q - z[..., None]) * s[..., None] - v).pow_(2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_mn = torch.where(better, cmn, best_mn)
            best_mx = torch.where(better, cmx, best_mx)
        return best_mn, best_mx


OBSERVER_CLASSES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def build_observer(spec: QuantSpec, shape: tuple[int, ...], role: str, name: str = "") -> Observer:
    """The observer named by `spec.observer`, sized for scales of `shape`."""
    accumulate = role != "weight" or spec.observer == "ema"
    return OBSERVER_CLASSES[spec.observer](spec, shape, accumulate=accumulate, name=name)
