"""GPTQ (Frantar et al., 2022) on one weight matrix, on exactly the recipe's grid.

Columns are quantized one at a time; each column's rounding error is spread over the columns
not yet quantized through the inverse Hessian of the layer objective `||W X - W_hat X||^2`
(`H = 2 X X^T / N`), so later columns compensate for earlier ones. The codes are the
contract's `clamp(round_half_even(w / s) + z, qmin, qmax)` with the spec's scales (fp16 ones
included): what GPTQ picks is what `convert` exports and every runtime computes.

Scales: per tensor and per channel from the whole matrix before the first column; per group
from the group's columns (error updates included) when its first column is reached, so
`block_size` must be a multiple of `group_size`. With `act_order` (columns by decreasing
Hessian diagonal) groups would be visited out of order, so their scales are all taken from the
original matrix first ("static groups"): the exported layout stays contiguous groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qat.quant import grid
from qat.quant.observers import build_observer
from qat.quant.spec import QuantSpec

GRANULARITIES = ("per_tensor", "per_channel", "per_group")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's knobs, named as in the reference implementation.

    `percdamp`: damping added to the Hessian diagonal, as a share of its mean. `block_size`:
    columns updated together (lazy batch updates; the result does not depend on it beyond
    float rounding). `act_order`: quantize columns by decreasing Hessian diagonal.
    `sequential`: each layer sees the outputs of the layers already quantized (else float
    inputs, one calibration pass for all layers).

    Example:
        >>> GPTQConfig(percdamp=0.01).block_size
        128
    """

    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    sequential: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.percdamp <= 1:
            raise ValueError(f"ptq.percdamp: got {self.percdamp!r}; allowed: a number in (0, 1]")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"ptq.block_size: got {self.block_size!r}; allowed: an integer >= 1")


def weight_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the 2-D weight slice `w` by the spec's own observer."""
    obs = build_observer(spec, grid.param_shape(spec, tuple(w.shape)), "weight")
    obs(w)
    return obs.qparams()


def check_spec(spec: QuantSpec, cols: int, block_size: int) -> None:
    """Refuse a weight grid GPTQ cannot walk column by column."""
    if spec.granularity not in GRANULARITIES or spec.dynamic:
        raise ValueError(f"{spec.path}: GPTQ quantizes static {', '.join(GRANULARITIES)} "
                         f"weights, not {spec.describe()}")
    if spec.granularity == "per_channel" and spec.axis != 0:
        raise ValueError(f"{spec.path}.axis: GPTQ needs per-channel scales along the output "
                         f"dim (axis 0), got {spec.axis}")
    if spec.granularity == "per_group" and (block_size % spec.group_size or cols % spec.group_size):
        raise ValueError(f"ptq.block_size: {block_size} must be a multiple of {spec.path}."
                         f"group_size ({spec.group_size}) for GPTQ's per-group scales")


def inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of `(H + damp I)^-1`, `damp = percdamp * mean(diag H)`: row `i`
    right of the diagonal says how column `i`'s error moves the columns after it."""
    damp = percdamp * torch.diagonal(h).mean()
    h = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def _per_row(scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec, rows: int):
    """`(rows, groups)` views of the scales (one group unless grouped): column `c` of group `g`
    uses `[:, g]`, and writes into a grouped view land in `scale` itself."""
    if spec.granularity == "per_tensor":
        return scale.reshape(1, 1).expand(rows, 1), zp.reshape(1, 1).expand(rows, 1)
    if spec.granularity == "per_channel":
        return scale.reshape(rows, 1), zp.reshape(rows, 1)
    return scale, zp


def _round(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return (torch.round(w / s) + z).clamp_(spec.qmin, spec.qmax)


def gptq_quantize(
    weight: torch.Tensor, h: torch.Tensor, spec: QuantSpec, config: GPTQConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(codes, scale, zero_point)` of the 2-D `weight` `(out, cols)` by GPTQ against the
    Hessian `h` `(cols, cols)`. Codes are integer-valued floats of `weight`'s shape; scale and
    zero point have `grid.param_shape(spec, weight.shape)`. Computes in float64 when `weight`
    is float64, else float32.

    Example:
        >>> spec = QuantSpec(bits=4, granularity="per_channel")
        >>> w, x = torch.randn(3, 8), torch.randn(64, 8)
        >>> q, s, z = gptq_quantize(w, 2 * x.T @ x / 64, spec)
        >>> q.shape, s.shape, bool(q.abs().max() <= 8)
        (torch.Size([3, 8]), torch.Size([3]), True)
    """
    config = config or GPTQConfig()
    rows, cols = weight.shape
    check_spec(spec, cols, config.block_size)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w, h = weight.detach().to(dtype).clone(), h.detach().to(dtype).clone()
    dead = torch.diagonal(h) == 0  # inputs that are always 0: any weight there is free
    h[dead, dead] = 1
    w[:, dead] = 0
    grouped = spec.granularity == "per_group"
    if grouped and not config.act_order:
        scale = torch.empty(rows, cols // spec.group_size, dtype=torch.float32)
        zp = torch.empty_like(scale)
    else:  # from the whole matrix before any update
        scale, zp = weight_qparams(w.float(), spec)
    perm = torch.argsort(torch.diagonal(h), descending=True) if config.act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, config.percdamp)
    codes = torch.zeros_like(w)
    s2, z2 = _per_row(scale, zp, spec, rows)
    for b0 in range(0, cols, config.block_size):
        b1 = min(b0 + config.block_size, cols)
        _quantize_block(w, u, codes, s2, z2, spec, b0, b1, perm)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.float(), scale, zp


def _quantize_block(w, u, codes, scale, zp, spec, b0, b1, perm) -> None:
    """Columns `b0:b1`, each error spread inside the block at once and after it in one
    matrix product (the lazy batch update). `scale`, `zp`: the `(rows, groups)` views."""
    blk, ublk = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
    err = torch.zeros_like(blk)
    grouped = spec.granularity == "per_group"
    for i in range(b1 - b0):
        col = b0 + i if perm is None else int(perm[b0 + i])
        g = col // spec.group_size if grouped else 0
        if grouped and perm is None and col % spec.group_size == 0:
            s, z = weight_qparams(blk[:, i : i + spec.group_size].float(), spec)
            scale[:, g], zp[:, g] = s[:, 0], z[:, 0]
        s, z = scale[:, g].to(w.dtype), zp[:, g].to(w.dtype)
        q = _round(blk[:, i], s, z, spec)
        codes[:, b0 + i] = q
        e = (blk[:, i] - (q - z) * s) / ublk[i, i]
        blk[:, i:] -= e[:, None] * ublk[i, i:][None, :]
        err[:, i] = e
    w[:, b1:] -= err @ u[b0:b1, b1:]
