"""`qat.plan` and `qat.prepare`: the quantization core's functions over the shipped layer
families (`qat.export.families.shipped()`), or over `families` extended with one's own."""

from __future__ import annotations

from torch import nn

from qat.export.families import shipped
from qat.quant import Recipe
from qat.quant import plan as _plan
from qat.quant import prepare as _prepare
from qat.quant.family import Families
from qat.quant.plan import Plan


def plan(
    model: nn.Module, recipe: Recipe | dict | str, families: Families | None = None,
    verbose: bool = False,
) -> Plan:  # fmt: skip
    """`qat.quant.plan` over the shipped layer families (or `families`)."""
    return _plan(model, recipe, families or shipped(), verbose)


def prepare(
    model: nn.Module, recipe: Recipe | dict | str, families: Families | None = None
) -> nn.Module:
    """`qat.quant.prepare` over the shipped layer families (or `families`)."""
    return _prepare(model, recipe, families or shipped())
