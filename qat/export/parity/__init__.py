"""The parity gate: `measure` (integer model against the fake-quant model), `align` (rounding
ties decided as the reference did), `compare` (the per-layer loop every check uses), `report`
(errors, thresholds, `check()`)."""

from qat.export.parity.align import Aligner, aligned
from qat.export.parity.compare import Recorder, compare_layers
from qat.export.parity.measure import Forward, as_tensor, default_forward, parity_report
from qat.export.parity.report import ParityError, ParityReport, TensorParity

__all__ = [
    "Aligner",
    "Forward",
    "ParityError",
    "ParityReport",
    "Recorder",
    "TensorParity",
    "aligned",
    "as_tensor",
    "compare_layers",
    "default_forward",
    "parity_report",
]
