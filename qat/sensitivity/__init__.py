"""Sensitivity scan -> mixed-precision recipe: which layers can take fewer bits, measured.

`scan` measures the loss change of quantizing one group of layers at a time at each candidate
`Width` (bits, optionally a group size); `choose` picks one width per group under a size budget
(a knapsack); `write_recipe` writes the choice as a recipe file that plans, trains and exports
like any shipped one.
"""

from qat.sensitivity.knapsack import choose
from qat.sensitivity.mixed_recipe import mixed_recipe, write_recipe
from qat.sensitivity.scan import Group, scan
from qat.sensitivity.width import Width, candidates

__all__ = ["Group", "Width", "candidates", "choose", "mixed_recipe", "scan", "write_recipe"]
