"""`FAMILIES`: the layer families that ship, each one entry from float type to ONNX nodes;
`shipped()`: those plus the families of optional libraries that are installed (transformers'
`Conv1D`, GPT-2's linear layer), the default of `qat.plan`/`prepare`/`load`.

To add one, write its fake-quant class (`qat.quant.modules.QATMixin` + the float layer), its
integer class (`qat.export.integer.IntLayer` with `from_qat`; its name is the manifest's kind)
and its ONNX builder, and pass `shipped().with_family(LayerFamily(...))` to `qat.plan`/`prepare`
and `qat.load`; `convert` and `export_onnx` read the families from the model's provenance (see
`tests/test_families.py` for a whole family written in a test).
"""

from __future__ import annotations

import importlib.util

from qat.export.integer import IntConv1d, IntConv2d, IntConvTranspose2d, IntEmbedding, IntLinear
from qat.export.integer.transformers_conv1d import IntConv1D
from qat.export.onnx.layers import (
    conv_graph,
    conv_transpose_graph,
    embedding_graph,
    linear_graph,
)
from qat.quant.attention import QATMultiheadAttention
from qat.quant.bn_fold import QATConvBn1d, QATConvBn2d
from qat.quant.family import Families, LayerFamily
from qat.quant.modules import (
    QATConv1d,
    QATConv2d,
    QATConvTranspose2d,
    QATEmbedding,
    QATLinear,
)

FAMILIES = Families([
    LayerFamily(QATLinear, IntLinear, linear_graph),
    LayerFamily(QATConv1d, IntConv1d, conv_graph, conv_bn_type=QATConvBn1d),
    LayerFamily(QATConv2d, IntConv2d, conv_graph, conv_bn_type=QATConvBn2d),
    LayerFamily(QATConvTranspose2d, IntConvTranspose2d, conv_transpose_graph),
    LayerFamily(QATEmbedding, IntEmbedding, embedding_graph),
    LayerFamily(QATMultiheadAttention),  # a container: its two projections are Linears
])  # fmt: skip


def shipped() -> Families:
    """`FAMILIES`, plus transformers' `Conv1D` where transformers is installed (importing it)."""
    if importlib.util.find_spec("transformers") is None:
        return FAMILIES
    from qat.quant.transformers_conv1d import QATConv1D  # an optional dependency

    return FAMILIES.with_family(LayerFamily(QATConv1D, IntConv1D, linear_graph))
