"""Training with Lightning (and Hydra in `run`): module, schedule callback, data stream."""

from qat.train.callbacks import QATScheduleCallback
from qat.train.module import QATModule

__all__ = ["QATModule", "QATScheduleCallback"]
