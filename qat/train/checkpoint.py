"""Safe checkpoint reading: `weights_only=True`, clear errors, `last` discovery."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint without unpickling arbitrary objects.

    A file that needs pickle to load (and so could run code) is refused with a clear error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it holds objects that only a full unpickle could build "
            f"(weights_only=True refused them: {str(e).splitlines()[0]}). qat never unpickles "
            "checkpoints; use a checkpoint written by qat's trainer."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {path} is unreadable or truncated: {e}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {path} has no state_dict: not a qat/Lightning checkpoint")
    return ckpt


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The wrapped model's state_dict (the LightningModule stores it under `model.`)."""
    sd = ckpt["state_dict"]
    return {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}


def find_last_checkpoint(run_root: Path) -> Path:
    """The newest checkpoint under `run_root/runs/*/checkpoints/` (for `ckpt_path=last`).

    Usually `last.ckpt`; a run killed between writing a step checkpoint and `last.ckpt`
    resumes from the step checkpoint. Writes are atomic, so no candidate is ever torn.
    """
    found = sorted(run_root.glob("runs/*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {run_root}/runs/*; "
            "pass ckpt_path=<file> or check run_name/paths.log_dir"
        )
    return found[-1]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file in the same folder, fsynced, then renamed.

    A crash or a full disk never leaves a truncated `.ckpt`; a failed write raises an error
    that names the file and the cause. Loading always uses `weights_only=True`.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise CheckpointWriteError(path, e) from None
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise CheckpointWriteError(path, e) from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path)


class CheckpointWriteError(RuntimeError):
    def __init__(self, path: Path, err: OSError) -> None:
        reason = os.strerror(err.errno) if err.errno else str(err)
        super().__init__(
            f"could not write checkpoint {path}: {reason}. Nothing partial was left behind; "
            "free disk space or point paths.log_dir / hydra.run.dir at a writable location, "
            "then resume with ckpt_path=last."
        )
