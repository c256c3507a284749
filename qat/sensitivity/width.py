"""One candidate weight format of the scan: a bit width, and for per-group weights optionally a
group size (a coarser group spends fewer bytes on scales, which can pay for more bits where a
layer needs them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Width:
    """`bits`, and `group_size` (0: the recipe's own). Its text is the key of tables and
    summaries: `4`, or `3g64` with a group size.

    Example:
        >>> sorted(candidates([4, 2], [64, 32]))[:2], str(Width(4)), str(Width(3, 64))
        ([Width(bits=2, group_size=32), Width(bits=2, group_size=64)], '4', '3g64')
    """

    bits: int
    group_size: int = 0

    def __str__(self) -> str:
        return f"{self.bits}g{self.group_size}" if self.group_size else str(self.bits)

    def weight(self, grouped: bool) -> dict[str, int]:
        """The weight-spec fields this width sets on a layer (`grouped`: a per-group one)."""
        if grouped and self.group_size:
            return {"bits": self.bits, "group_size": self.group_size}
        return {"bits": self.bits}


def candidates(bits: list[int], group_sizes: list[int] | None = None) -> list[Width]:
    """Every width the scan measures: each of `bits`, at each of `group_sizes` when given."""
    return [Width(int(b), int(g)) for b in bits for g in (group_sizes or [0])]
