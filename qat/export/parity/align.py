"""Tie alignment: an integer layer quantizes the reference's value where its own input lies
within a tolerance of it, so rounding ties fp32 cannot decide are decided as the reference did
(see `measure`); whatever is larger than a tie still propagates."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from qat.export.integer.layer import IntLayer
from qat.quant import grid


class Aligner:
    """`IntLayer.align_act`: decides rounding ties the way the reference's quantizer did.

    `records[(layer, role)]` are the reference's quantizer inputs, one per call, `names` maps
    `id(layer)` to its name; an input within `tolerance` steps of the reference's is replaced
    by it. `aligned` counts the codes that changed, `max_distance` the farthest such tie.

    Example:
        >>> from qat.export import IntLinear
        >>> from qat.quant.spec import QuantSpec
        >>> lin = IntLinear(2, 1, input_spec=QuantSpec(bits=8), weight_spec=QuantSpec(bits=8))
        >>> ref = torch.tensor([[0.5, 1.0]])  # scale 1: 0.5 is a tie between codes 0 and 1
        >>> al = Aligner({("fc", "input"): [ref]}, {id(lin): "fc"}, tolerance=0.01)
        >>> al(lin, "input", ref + 1e-7).tolist(), al.aligned
        ([[0.5, 1.0]], 1)
    """

    def __init__(self, records: dict, names: dict[int, str], tolerance: float) -> None:
        self.records, self.names, self.tolerance = records, names, tolerance
        self.cursor: dict[tuple[str, str], int] = {}
        self.aligned = 0
        self.max_distance = 0.0  # of an aligned tie from the reference, in steps

    def __call__(self, layer: IntLayer, role: str, x: torch.Tensor) -> torch.Tensor:
        key = (self.names[id(layer)], role)
        queue, i = self.records.get(key, []), self.cursor.get(key, 0)
        if i >= len(queue) or queue[i].shape != x.shape:
            return x
        self.cursor[key] = i + 1
        ref = queue[i].to(x.dtype)
        queue[i] = None  # each record serves one call: free it
        spec = getattr(layer, f"{role}_spec")
        s_ref, _ = layer.act_qparams(role, ref)
        dist = grid.from_view(grid.to_view((x - ref).abs(), spec) / s_ref[..., None], spec,
                              x.shape)  # in quantization steps  # fmt: skip
        out = torch.where(dist <= self.tolerance, ref, x)
        changed = self._centered(layer, role, x) != self._centered(layer, role, out)
        if changed.any():
            self.aligned += int(changed.sum())
            far = grid.to_view(dist, spec)[changed].max().item()
            self.max_distance = max(self.max_distance, far)
        return out

    @staticmethod
    def _centered(layer: IntLayer, role: str, x: torch.Tensor) -> torch.Tensor:
        spec = getattr(layer, f"{role}_spec")
        q, _, z = layer.act_codes(role, x)
        return grid.to_view(q, spec) - z[..., None]


@contextlib.contextmanager
def aligned(model: nn.Module, names: Iterable[str], aligner: Aligner | None) -> Iterator[None]:
    """Set `aligner` on the integer layers `names` of `model` for the block; unset after."""
    layers = [model.get_submodule(n) for n in names]
    for layer in layers:
        layer.align_act = aligner
    try:
        yield
    finally:
        for layer in layers:
            layer.align_act = None
