"""`IntConv1D`: the integer layer of transformers' `Conv1D` (GPT-2): an `IntLinear` on the
`(out, in)` weight, under its own manifest kind so a loader puts it where a `Conv1D` was."""

from __future__ import annotations

from qat.export.integer.linear import IntLinear


class IntConv1D(IntLinear):
    """Integer transformers `Conv1D`: computes `IntLinear`'s numerics (see there).

    Example:
        >>> from qat.quant.spec import QuantSpec
        >>> IntConv1D(4, 6, weight_spec=QuantSpec(bits=8)).weight_shape
        (6, 4)
    """
