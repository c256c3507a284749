"""How a run that stops on bad input or a failed write says so: one line (the trace with
HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

from hydra.errors import CompactHydraException

# What a run reports in one line: qat's errors for bad input (ValueError and its kin, e.g.
# ParityError, ArtifactError), failed writes (OSError, e.g. WriteError), a diverged loss.
# Anything else is a bug somewhere and keeps its traceback.
EXPECTED = (ValueError, OSError, FloatingPointError)


class RunError(CompactHydraException):
    """A run stopped: Hydra prints the message alone, without a traceback."""


def one_line(e: BaseException) -> str:
    """The message of `e`; the exception's type too where the message alone is unclear."""
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"
