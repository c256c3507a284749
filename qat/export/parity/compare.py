"""The one per-layer comparison loop of the parity gate, used by the integer check (`measure`)
and the ONNX Runtime check (`qat.export.onnx.parity`): each layer's outputs in the model under
test against the reference's, call by call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


class LayerComparison:
    """Each layer's outputs under test against `refs[name]`, call by call, into `report.layers`
    as they arrive (`add`); a reference output is dropped once compared, so a live comparison
    (`live`) holds one layer's output at a time, not the whole model's. `finish` checks that
    every layer ran as often on both sides (`what` names them) and adds the ties `aligner`
    decided in that run (if it ran aligned) to the report's tie counts.

    A layer that ran a different number of times cannot be compared: `ParityError` says so (a
    layer called in Python control flow a trace did not follow, or a reference that is not the
    model this one came from)."""

    def __init__(
        self,
        report: ParityReport,
        refs: dict[str, list[torch.Tensor | None]],
        what: tuple[str, str] = ("the reference", "the integer model"),
        aligner: Aligner | None = None,
    ) -> None:
        self.report, self.refs, self.what, self.aligner = report, refs, what, aligner
        self.layers = {layer.name: layer for layer in report.layers}
        self.calls: dict[str, int] = {}

    def add(self, name: str, out: torch.Tensor) -> None:
        i = self.calls.get(name, 0)
        self.calls[name] = i + 1
        queue = self.refs.get(name, [])
        if name in self.layers and i < len(queue):
            self.layers[name].add(queue[i], out)
            queue[i] = None

    def finish(self) -> None:
        for name in self.layers:
            r, o = len(self.refs.get(name, [])), self.calls.get(name, 0)
            if r != o:
                raise ParityError(f"{name} ran {r} time(s) in {self.what[0]} but {o} in "
                                  f"{self.what[1]} on the same batch")  # fmt: skip
        if self.aligner is not None:
            self.report.aligned += self.aligner.aligned
            self.report.max_tie_distance = max(self.report.max_tie_distance,
                                               self.aligner.max_distance)  # fmt: skip


@contextlib.contextmanager
def live(model: nn.Module, names: list[str], comparison: LayerComparison) -> Iterator[None]:
    """Forward hooks on modules `names` of `model` handing each output to `comparison` as it
    is produced; `comparison.finish()` after the block."""
    def hook(name: str) -> Any:
        return lambda _mod, _args, out: comparison.add(name, out.detach())

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    comparison.finish()


def compare_layers(
    report: ParityReport,
    refs: dict[str, list[torch.Tensor]],
    outs: dict[str, list[torch.Tensor]],
    what: tuple[str, str] = ("the reference", "the integer model"),
    aligner: Aligner | None = None,
) -> None:
    """`LayerComparison` of recorded outputs `outs[name]` against `refs[name]`."""
    comparison = LayerComparison(report, refs, what, aligner)
    for name, calls in outs.items():
        for out in calls:
            comparison.add(name, out)
    comparison.finish()
