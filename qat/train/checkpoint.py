"""Safe checkpoint reading: `weights_only=True`, clear errors, `last` discovery."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


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
    """The newest `runs/*/checkpoints/last.ckpt` under `run_root` (for `ckpt_path=last`)."""
    found = sorted(run_root.glob("runs/*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {run_root}/runs/*; "
            "pass ckpt_path=<file> or check run_name/paths.log_dir"
        )
    return found[-1]
