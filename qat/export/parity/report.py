"""`ParityReport`: what the parity gate measured, and the gate itself (`check`).

Definitions, per tensor and over every call and batch: `max_abs = max |int - ref|`,
`rel = max_abs / max |ref|` (the largest error against the tensor's own magnitude, not
elementwise, so values near zero cannot blow it up), `top1` = the share of last-dim vectors whose
argmax agrees (next-token / class agreement for logits), `min_cosine` = the smallest cosine
similarity of last-dim vectors (for embedding outputs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


class ParityError(ValueError):
    """The integer model does not reproduce the fake-quant model within the tolerances."""


def _nanmax(a: float, b: float) -> float:
    """`max` where NaN wins (Python's `max` would drop it, and a NaN output must fail)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


@dataclass
class TensorParity:
    """Errors of one tensor (a layer's output or the model's), over all calls and batches.

    Example:
        >>> t = TensorParity("logits")
        >>> t.add(torch.tensor([[1.0, 4.0]]), torch.tensor([[1.0, 3.996]]), rows=True)
        >>> round(t.rel, 6), t.top1
        (0.001, 1.0)
    """

    name: str
    max_abs: float = 0.0
    max_ref: float = 0.0
    top1: float | None = None
    min_cosine: float | None = None
    calls: int = 0
    _agree: int = field(default=0, repr=False)
    _rows: int = field(default=0, repr=False)

    @property
    def rel(self) -> float:
        if self.max_ref > 0:
            return self.max_abs / self.max_ref
        return 0.0 if self.max_abs == 0 else float("inf")

    @torch.no_grad()
    def add(self, ref: torch.Tensor, out: torch.Tensor, rows: bool = False) -> None:
        """Fold one (reference, integer) pair in; `rows` adds top-1 and cosine over the last dim."""
        if ref.shape != out.shape:
            raise ParityError(
                f"{self.name}: the integer model's output has shape {tuple(out.shape)}, "
                f"the reference's {tuple(ref.shape)}"
            )
        r, o = ref.detach().double(), out.detach().double()
        self.calls += 1
        if r.numel():
            self.max_abs = _nanmax(self.max_abs, (r - o).abs().max().item())
            self.max_ref = _nanmax(self.max_ref, r.abs().max().item())
        if not rows or r.ndim == 0 or not r.numel():
            return
        self._agree += int((r.argmax(-1) == o.argmax(-1)).sum())
        self._rows += r[..., 0].numel()
        self.top1 = self._agree / self._rows
        cos = torch.nn.functional.cosine_similarity(r, o, dim=-1).min().item()
        self.min_cosine = cos if self.min_cosine is None else min(self.min_cosine, cos)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (standard JSON has no inf or NaN: those become strings)."""
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["rel"] = self.rel
        return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in d.items()}  # fmt: skip


@dataclass
class ParityReport:
    """Per-layer and output parity of an integer model against its fake-quant reference.

    `output` and `layers` come from the aligned run (rounding ties the reference decided the
    other way, `aligned` of them, are decided as the reference did: see `parity_report`);
    `free_running` is the plain integer model's output, for information.

    Example:
        >>> out = TensorParity("output", max_abs=1e-6, max_ref=2.0, top1=1.0, calls=1)
        >>> ParityReport(out).check(max_rel_error=1e-4)  # passes: rel 5e-7, full agreement
        >>> ParityReport(out).to_dict()["output"]["rel"]
        5e-07
    """

    output: TensorParity
    layers: list[TensorParity] = field(default_factory=list)
    free_running: TensorParity | None = None
    batches: int = 0
    aligned: int = 0
    tie_tolerance: float = 0.0
    max_tie_distance: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "definition": "rel = max|int - ref| / max|ref|; top1 = argmax(-1) agreement",
            "batches": self.batches,
            "aligned_ties": self.aligned,
            "tie_tolerance": self.tie_tolerance,
            "max_tie_distance": self.max_tie_distance,
            "output": self.output.to_dict(),
            "free_running": self.free_running.to_dict() if self.free_running else None,
            "layers": [t.to_dict() for t in self.layers],
        }

    def __str__(self) -> str:
        head = f"{'tensor':<44} {'max_abs':>10} {'rel':>10} {'top1':>8} {'min_cos':>10}"
        lines = [head, "-" * len(head)]
        rows = [*self.layers, self.output]
        if self.free_running is not None:
            rows.append(self.free_running)
        for t in rows:
            top1 = f"{t.top1:.4f}" if t.top1 is not None else "-"
            cos = f"{t.min_cosine:.6f}" if t.min_cosine is not None else "-"
            lines.append(f"{t.name:<44} {t.max_abs:>10.3e} {t.rel:>10.3e} {top1:>8} {cos:>10}")
        lines.append(
            f"{self.batches} batch(es); {self.aligned} rounding tie(s) within "
            f"{self.tie_tolerance:g} of a step decided as the reference did"
            + (f" (farthest {self.max_tie_distance:.1e} steps)" if self.aligned else "")
        )
        return "\n".join(lines)

    def failures(
        self,
        max_rel_error: float = 1e-4,
        min_top1_agreement: float | None = 1.0,
        min_cosine: float | None = None,
    ) -> list[str]:
        """Why the gate fails (empty when it passes)."""
        out, bad = self.output, []
        for t in [*self.layers, out]:
            if not t.rel <= max_rel_error:  # also catches NaN
                bad.append(f"{t.name}: relative error {t.rel:.3e} > {max_rel_error:.1e}")
        if min_top1_agreement is not None and out.top1 is not None:
            if out.top1 < min_top1_agreement:
                bad.append(f"top-1 agreement {out.top1:.4f} < {min_top1_agreement}")
        if min_cosine is not None and out.min_cosine is not None and out.min_cosine < min_cosine:
            bad.append(f"min cosine similarity {out.min_cosine:.6f} < {min_cosine}")
        return bad

    def check(
        self,
        max_rel_error: float = 1e-4,
        min_top1_agreement: float | None = 1.0,
        min_cosine: float | None = None,
    ) -> None:
        """Raise `ParityError` (the report in its message) if any tolerance is exceeded.

        `max_rel_error` bounds every layer's and the output's `rel`; `min_top1_agreement`
        (None to skip, e.g. for embedding models) and `min_cosine` bound the output.
        """
        bad = self.failures(max_rel_error, min_top1_agreement, min_cosine)
        if bad:
            raise ParityError(
                "export parity gate failed: the integer model does not compute what the "
                "fake-quant model computed:\n  " + "\n  ".join(bad) + "\n" + str(self)
            )
