"""The integer executor: layers holding integer codes and scales that compute the numerics
contract exactly (`layer` the shared state, one file per layer family, `packing` for int4)."""

from qat.export.integer.conv import IntConv1d, IntConv2d
from qat.export.integer.conv_transpose import IntConvTranspose2d
from qat.export.integer.embedding import IntEmbedding
from qat.export.integer.layer import IntLayer
from qat.export.integer.linear import IntLinear, integer_matmul, scaled_matmul

__all__ = [
    "IntConv1d",
    "IntConv2d",
    "IntConvTranspose2d",
    "IntEmbedding",
    "IntLayer",
    "IntLinear",
    "integer_matmul",
    "scaled_matmul",
]
