"""The widths chosen for a scan under a budget, and what they predict beside uniform widths."""

from __future__ import annotations

from dataclasses import dataclass

from qat.sensitivity.knapsack import choose
from qat.sensitivity.scan import Group
from qat.sensitivity.width import Width


@dataclass
class Choice:
    """Group -> width under `budget` bytes; `size` bytes, `predicted` the summed change.

    Example:
        >>> four, eight = Width(4), Width(8)
        >>> a = Group("a", ["a"], 64, bytes={four: 32, eight: 64}, delta={four: 0.5, eight: 0})
        >>> b = Group("b", ["b"], 64, bytes={four: 32, eight: 64}, delta={four: 0.1, eight: 0})
        >>> c = Choice.under([a, b], budget=96)
        >>> {g: str(w) for g, w in c.widths.items()}, c.bits_per_weight(), c.uniform()[four]
        ({'a': '8', 'b': '4'}, 6.0, (64, 0.6))
    """

    groups: list[Group]
    budget: float
    widths: dict[str, Width]
    size: int
    predicted: float

    @classmethod
    def under(cls, groups: list[Group], budget: float) -> Choice:
        """The least predicted change whose artifact bytes fit `budget` (a knapsack);
        `ValueError` if even the smallest candidates do not."""
        least = sum(min(g.bytes.values()) for g in groups)
        if least > budget:  # said in the units a user sets the budget in
            bpw = 8 / sum(g.weights for g in groups)
            raise ValueError(
                f"the budget, {budget / 2**20:.4f} MiB ({budget * bpw:.3f} bits per scanned "
                f"weight), is below the smallest size the candidates allow, {least / 2**20:.4f} "
                f"MiB ({least * bpw:.3f}): raise the budget, or add a smaller width to "
                "sensitivity.bits (or a larger one to sensitivity.group_sizes)")
        widths = sorted(groups[0].bytes)
        picks = choose([[(g.bytes[b], g.delta[b]) for b in widths] for g in groups], budget)
        chosen = {g.name: widths[i] for g, i in zip(groups, picks, strict=True)}
        size = sum(g.bytes[chosen[g.name]] for g in groups)
        return cls(groups, budget, chosen, size, sum(g.delta[chosen[g.name]] for g in groups))

    @property
    def weights(self) -> int:
        return sum(g.weights for g in self.groups)

    def bits_per_weight(self, size: float | None = None) -> float:
        return 8 * (self.size if size is None else size) / self.weights

    def layer_widths(self) -> dict[str, Width]:
        return {n: self.widths[g.name] for g in self.groups for n in g.layers}

    def at(self, widths: dict[str, Width]) -> tuple[int, float]:
        """The size and predicted change of the groups at `widths` (group -> width)."""
        return (sum(g.bytes[widths[g.name]] for g in self.groups),
                sum(g.delta[widths[g.name]] for g in self.groups))  # fmt: skip

    def uniform(self) -> dict[Width, tuple[int, float]]:
        """Per width, the size and predicted change of every group at that width."""
        return {b: self.at(dict.fromkeys(self.widths, b)) for b in sorted(self.groups[0].bytes)}

    def description(self) -> str:
        used = "/".join(map(str, sorted(set(self.widths.values()))))
        return (f"mixed {used}-bit weights from task=sensitivity, "
                f"{self.bits_per_weight():.3f} bits per weight")  # fmt: skip
