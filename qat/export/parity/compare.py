"""The one per-layer comparison loop of the parity gate, used by the integer check (`measure`)
and the ONNX Runtime check (`qat.export.onnx.parity`): each layer's outputs in the model under
test against the reference's, call by call."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qat.export.parity.align import Aligner
from qat.export.parity.report import ParityError, ParityReport


class Recorder:
    """Forward hooks collecting the outputs of modules `names` of `model`, per call; use as a
    context manager (the hooks are removed on exit).

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> with Recorder(m, ["0"]) as rec:
        ...     _ = m(torch.zeros(1, 2)); _ = m(torch.ones(1, 2))
        >>> len(rec.outs["0"])
        2
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outs: dict[str, list[torch.Tensor]] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Any:
        def hook(_mod: nn.Module, _args: Any, out: torch.Tensor) -> None:
            self.outs.setdefault(name, []).append(out.detach())

        return hook

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def compare_layers(
    report: ParityReport,
    refs: dict[str, list[torch.Tensor]],
    outs: dict[str, list[torch.Tensor]],
    what: tuple[str, str] = ("the reference", "the integer model"),
    aligner: Aligner | None = None,
) -> None:
    """Add every layer's outputs `outs[name]` against `refs[name]` to `report.layers`, and the
    ties `aligner` decided in that run (if it ran aligned) to the report's tie counts.

    A layer that ran a different number of times on the two sides (`what` names them) cannot be
    compared: `ParityError` says so (a layer called in Python control flow a trace did not
    follow, or a reference that is not the model this one came from)."""
    for layer in report.layers:
        r, o = refs.get(layer.name, []), outs.get(layer.name, [])
        if len(r) != len(o):
            raise ParityError(
                f"{layer.name} ran {len(r)} time(s) in {what[0]} but {len(o)} in {what[1]} on "
                "the same batch"
            )
        for ref, out in zip(r, o, strict=True):
            layer.add(ref, out)
    if aligner is not None:
        report.aligned += aligner.aligned
        report.max_tie_distance = max(report.max_tie_distance, aligner.max_distance)
