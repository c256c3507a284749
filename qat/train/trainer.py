"""Lightning Trainers from the config: one per stage (float, qat) and one for evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig

from qat.io import WriteError, atomic_write
from qat.train.callbacks import FinalCheckpoint
from qat.train.checkpoint import Checkpoint, load_checkpoint
from qat.train.console import StepProgressBar
from qat.train.data import set_stream_position, stream_loader
from qat.train.module import QATModule


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written; the previous ones are whole and resume."""

    def __init__(self, path: Path, err: OSError, what: str = "checkpoint") -> None:
        super().__init__(path, err, what, then=", then resume with ckpt_path=last")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writes through `qat.io.atomic_write` (temp file in the same
    folder, fsync, rename, fsync the folder); reads with `weights_only=True`.

    A crash or a full disk never leaves a truncated `.ckpt`; a failed write raises
    `CheckpointWriteError` naming the file and the cause.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        atomic_write(path, lambda f: _torch_save(checkpoint, f), "checkpoint",
                     CheckpointWriteError)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, lightning=False)


class _Sink:
    """A file for `torch.save` that keeps the first `OSError` of a write: torch's writer
    turns it into a RuntimeError ("unexpected pos ...") that names neither cause nor file."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, f: Any) -> None:
    sink = _Sink(f)
    try:
        torch.save(obj, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise


def is_rank_zero() -> bool:
    """True in the process that reports and exports (rank 0 under DDP, else always)."""
    return rank_zero_only.rank == 0


def _callback(node: DictConfig, out_dir: Path, stage: str) -> L.Callback:
    """A configured callback, told where this stage's checkpoints go or what it is called."""
    kind = hydra.utils.get_class(node._target_)
    if issubclass(kind, ModelCheckpoint):
        return hydra.utils.instantiate(node, dirpath=str(out_dir / "checkpoints"))
    if issubclass(kind, StepProgressBar):
        return hydra.utils.instantiate(node, stage=stage)
    return hydra.utils.instantiate(node)


def make_trainer(
    cfg: DictConfig, out_dir: Path, stage: str, max_steps: int, single: bool = False
) -> L.Trainer:
    """The configured Trainer; `single=True` for evaluation (one process even under DDP, no
    checkpoints, no progress bar: evaluation prints its own result)."""
    callbacks = [_callback(c, out_dir, stage) for c in (cfg.get("callbacks") or {}).values()]
    if single:
        callbacks = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, ProgressBar))]
    if not cfg.trainer.get("enable_progress_bar", True):  # the switch alone turns bars off
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = []
    for lg in (cfg.get("logger") or {}).values():  # one log folder per stage: logs/float, ...
        loggers.append(hydra.utils.instantiate(lg, name=f"{lg.get('name', 'logs')}/{stage}"))
    over: dict[str, Any] = {}
    if single:
        over = {"strategy": "auto", "devices": 1, "num_nodes": 1, "enable_progress_bar": False}
    elif "spawn" in str(cfg.trainer.get("strategy", "")):
        # Spawned workers receive the model through shared memory; file descriptors fail
        # here for some storages ("unable to resize file"), named files work.
        torch.multiprocessing.set_sharing_strategy("file_system")
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=(loggers or False) if not single else False,
        max_steps=max_steps,
        default_root_dir=str(out_dir),
        plugins=[AtomicCheckpointIO()],  # every checkpoint Lightning writes is atomic
        **over,
    )


def evaluate(cfg: DictConfig, module: QATModule, dm: Any, out_dir: Path) -> dict[str, float]:
    """Metrics on val and test as `{"val/acc": ..., "test/acc": ...}`, in this process."""
    trainer = make_trainer(cfg, out_dir, "eval", 0, single=True)
    out: dict[str, float] = {}
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        fn = trainer.validate if split == "val" else trainer.test
        res = fn(module, dataloaders=loader, verbose=False)
        out.update({k: float(v) for k, v in res[0].items() if k.startswith(f"{split}/")})
    return out


def fit(
    cfg: DictConfig,
    module: QATModule,
    dm: Any,
    out_dir: Path,
    stage: str,
    max_steps: int,
    resume: Checkpoint | None = None,
    extra_callbacks: tuple = (),
) -> L.Trainer:
    """Train `module` for `max_steps` optimizer steps (0: nothing to do, e.g. PTQ).

    Resuming from `resume`, the data stream continues where that run left it.
    """
    trainer = make_trainer(cfg, out_dir, stage, max_steps)
    if max_steps == 0 and resume is None:
        return trainer
    trainer.callbacks.extend([*extra_callbacks, FinalCheckpoint()])
    loader = stream_loader(dm, int(cfg.seed))
    if resume is not None:
        accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
        set_stream_position(loader, resume.global_step, accumulate)
    val = dm.val_dataloader() if cfg.trainer.get("limit_val_batches", 1) != 0 else None
    trainer.fit(
        module,
        train_dataloaders=loader,
        val_dataloaders=val,
        ckpt_path=str(resume.path) if resume is not None else None,
        weights_only=True,
    )
    # The checkpoints hold the optimizer; evaluation and export need the model alone, and
    # AdamW's state (twice the trainable weights) would otherwise live on through export.
    trainer.strategy.optimizers, trainer.strategy.lr_scheduler_configs = [], []
    return trainer
