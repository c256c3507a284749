"""One candidate weight format of the scan: a bit width, and for per-group weights optionally a
group size (a coarser group spends fewer bytes on scales, which can pay for more bits where a
layer needs them)."""

from __future__ import annotations

from dataclasses import dataclass

from qat.quant.spec import QuantSpec


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

    @classmethod
    def of(cls, spec: QuantSpec, sizes: list[int]) -> Width:
        """The candidate `spec` is, when the scan's candidate group sizes are `sizes`: a layer
        that is not per-group measures the same at each size, so it counts as the first.

        Example:
            >>> g64 = QuantSpec(bits=3, granularity="per_group", group_size=64)
            >>> ch = QuantSpec(bits=8, granularity="per_channel")
            >>> str(Width.of(g64, [32, 64])), str(Width.of(g64, [])), str(Width.of(ch, [32]))
            ('3g64', '3', '8g32')
        """
        if not sizes:
            return cls(spec.bits)
        return cls(spec.bits, spec.group_size if is_grouped(spec) else sizes[0])

    def weight(self, grouped: bool) -> dict[str, int]:
        """The weight-spec fields this width sets on a layer (`grouped`: a per-group one)."""
        if grouped and self.group_size:
            return {"bits": self.bits, "group_size": self.group_size}
        return {"bits": self.bits}


def is_grouped(spec: QuantSpec) -> bool:
    """Whether candidate group sizes apply to a weight of this spec."""
    return spec.granularity == "per_group"


def candidates(bits: list[int], group_sizes: list[int] | None = None) -> list[Width]:
    """Every width the scan measures: each of `bits`, at each of `group_sizes` when given."""
    return [Width(int(b), int(g)) for b in bits for g in (group_sizes or [0])]
