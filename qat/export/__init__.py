"""Export: integer layers, `convert`, the parity gate, and the safetensors artifact.

    int_model = qat.convert(model)                      # fake-quant layers -> integer layers
    report = parity_report(model, int_model, batches)   # per-layer and output errors
    report.check()                                      # the gate: ParityError if exceeded
    qat.save(int_model, "out/model", parity=report)     # weights.safetensors + manifest.json
    int_model = qat.load("out/model")                   # checked, rebuilt via the registry

`export_model` does convert, gate and save in one call.
"""

from qat.export.artifact import load, read_manifest, save
from qat.export.convert import ConvertError, convert
from qat.export.integer import (
    IntConv1d,
    IntConv2d,
    IntConvTranspose2d,
    IntEmbedding,
    IntLayer,
    IntLinear,
)
from qat.export.integer.packing import pack_int4, unpack_int4
from qat.export.manifest import FORMAT_VERSION, ArtifactError
from qat.export.parity import (
    ParityError,
    ParityReport,
    TensorParity,
    default_forward,
    parity_report,
)
from qat.export.pipeline import export_model

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "ConvertError",
    "IntConv1d",
    "IntConv2d",
    "IntConvTranspose2d",
    "IntEmbedding",
    "IntLayer",
    "IntLinear",
    "ParityError",
    "ParityReport",
    "TensorParity",
    "convert",
    "default_forward",
    "export_model",
    "load",
    "pack_int4",
    "parity_report",
    "read_manifest",
    "save",
    "unpack_int4",
]
