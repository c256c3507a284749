"""Reading checkpoints safely: `weights_only=True`, one clear error per bad file, `last`.

Nothing here imports Lightning, so a run checks its checkpoint before the trainer loads.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qat.train.sharded_checkpoint import consolidate, is_sharded_checkpoint


def _not_a_checkpoint(path: Path) -> str | None:
    """Why `path` cannot be a `torch.save` file (a zip archive) or a sharded checkpoint's
    folder, or None if it may be one."""
    if path.is_dir():
        return None if is_sharded_checkpoint(path) else "it is a folder without an index.json"
    size = path.stat().st_size
    if size == 0:
        return "it is empty"
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            head = f.read(64)
        if head.startswith(b"PK\x03\x04"):
            return "it is truncated (a zip archive without its end: the write was cut short)"
        text = head.isascii() and bool(head.strip())
        kind = "a text file" if text else f"{size} bytes of another format"
        return f"it is {kind}, not a checkpoint written by torch.save (a zip archive)"
    return None


def load_checkpoint(path: str | Path, mmap: bool = False, lightning: bool = True) -> dict[str, Any]:
    """Load a Lightning checkpoint without unpickling arbitrary objects.

    A file that needs pickle to load (and so could run code) is refused; a file that is not a
    checkpoint at all (text, empty, truncated) gets an error naming it. A sharded checkpoint's
    folder is consolidated (`sharded_checkpoint`). `mmap=True` maps the
    tensors instead of reading them: cheap when only the metadata is needed. `lightning=False`
    accepts any weights-only dict (Lightning's own temporary files under `ddp_spawn`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    why = _not_a_checkpoint(path)
    if why is not None:
        raise ValueError(f"checkpoint {path} is unreadable or truncated: {why}")
    try:
        ckpt = (consolidate(path) if path.is_dir()
                else torch.load(path, map_location="cpu", weights_only=True, mmap=mmap))
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it holds objects that only a full unpickle could build "
            f"(weights_only=True refused them: {str(e).splitlines()[0]}). qat never unpickles "
            "checkpoints; use a checkpoint written by qat's trainer."
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"checkpoint {path} is unreadable or truncated: {e}") from None
    if lightning and (not isinstance(ckpt, dict) or "state_dict" not in ckpt):
        raise ValueError(f"checkpoint {path} has no state_dict: not a qat/Lightning checkpoint")
    return ckpt


@dataclass(frozen=True)
class Checkpoint:
    """A qat checkpoint opened memory-mapped: its metadata, step and (lazily read) tensors.

    Opened once, before the run loads data; the run then builds its model from `data`.
    """

    path: Path  # absolute, so metadata that records it stays valid from any directory
    meta: dict[str, Any]
    global_step: int
    data: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, key: str = "checkpoint") -> Checkpoint:
        """`key` names the setting in errors (`ckpt_path`, `init_from`)."""
        if not Path(path).exists():
            raise FileNotFoundError(f"{key}={path} does not exist")
        try:  # tensors memory-mapped: read only where they are used
            ckpt = load_checkpoint(path, mmap=True)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        meta = ckpt.get("qat_meta")
        if not isinstance(meta, dict) or "model" not in meta:
            raise ValueError(f"{key}: {path} has no qat metadata: it was not written by "
                             "qat's trainer")
        return cls(Path(path).resolve(), meta, int(ckpt.get("global_step", 0)), ckpt)

    @property
    def is_float(self) -> bool:
        return self.meta.get("recipe") is None


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The wrapped model's state_dict (the LightningModule stores it under `model.`)."""
    sd = ckpt["state_dict"]
    return {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}


def differences(a: Any, b: Any, path: str) -> list[str]:
    """Paths (`recipe.schedule.calibrate`) where two JSON-like values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: checkpoint {a!r}, this run {b!r}"]


def objective_of(meta: dict[str, Any] | None) -> str | None:
    """The objective a checkpoint's or artifact's metadata names (stored as "task" before the
    key was renamed, so older files still check)."""
    meta = meta or {}
    return meta.get("objective", meta.get("task"))


def check_meta(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse a checkpoint made with another model, recipe or objective, naming the difference."""
    if saved is None:
        raise ValueError("checkpoint has no qat metadata: it was not written by qat's trainer")
    saved = {**saved, "objective": objective_of(saved)}
    for key in ("objective", "model", "recipe"):
        if key in current and saved.get(key) != current.get(key):
            diffs = differences(saved.get(key), current.get(key), key)
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            raise ValueError(
                f"checkpoint mismatch in {key!r}: {'; '.join(diffs[:5])}{more}. Use the same "
                f"{key} settings as the run that wrote it (or start a new run without ckpt_path)."
            )


def find_last_checkpoint(run_root: Path) -> Path:
    """The newest checkpoint under `run_root/runs/*/checkpoints/` that loads (`ckpt_path=last`).

    Usually `last.ckpt`; a run killed between writing a step checkpoint and `last.ckpt`
    resumes from the step checkpoint. Our writes are atomic, but a folder may hold files from
    elsewhere (a copy cut short, a file of another program): those are skipped, with one
    warning line naming them. Candidates are opened memory-mapped, so checking is cheap.
    """
    found = sorted(run_root.glob("runs/*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    skipped = []
    for path in reversed(found):
        why = _not_a_checkpoint(path)
        if why is None:
            try:
                load_checkpoint(path, mmap=True)
            except ValueError:
                why = "it does not load as a qat checkpoint"
        if why is not None:
            skipped.append(f"{path} ({why})")
            continue
        if skipped:
            logging.getLogger(__name__).warning(
                "ckpt_path=last: skipped %d newer unreadable checkpoint(s): %s",
                len(skipped), "; ".join(skipped))
        return path
    raise FileNotFoundError(
        f"ckpt_path=last: no checkpoints/last.ckpt under {run_root}/runs/*"
        + (f" that loads ({len(skipped)} unreadable: {skipped[0]})" if skipped else "")
        + "; pass ckpt_path=<file> or check run_name/paths.log_dir"
    )
