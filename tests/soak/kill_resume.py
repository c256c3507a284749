"""SIGKILL a real `train.py` run at random instants (while a checkpoint is being written, too),
resume it with `ckpt_path=last`, and compare the final weights, optimizer, LR schedule,
quantizer state and RNG state with an uninterrupted run, tensor by tensor.

    .venv/bin/python -m tests.soak.kill_resume --trials 20

The suite runs two trials (`tests/train/test_reliability.py`); this script runs many and
reports how many finished bit-identical.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qat.train.checkpoint import find_last_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RUN = [
    "model.args.widths=[16,32]",
    "data.batch_size=32",
    "float_stage.max_steps=0",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "recipe=w8a8",
    "recipe.schedule.calibrate=4",
    "recipe.schedule.freeze_observers=0.6",
    "recipe.schedule.freeze_bn=0.6",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.filename='s{step}'",
    "logger=none",
    "export.enabled=false",
    "threads=1",
]
STEP_CHECKPOINTS = 20  # trainer.max_steps / every_n_train_steps
COMPARED = ("state_dict", "optimizer_states", "lr_schedulers", "qat_rng", "global_step")


def _run(args: list[str], log_dir: Path, run_dir: Path, data_dir: Path, **kw: Any):
    cmd = [sys.executable, "train.py", *RUN, f"paths.log_dir={log_dir}",
           f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *args]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kw)


def final_state(log_dir: Path) -> dict[str, Any]:
    """What a run ended with: the newest checkpoint that loads, compared parts only."""
    ckpt = load_checkpoint(find_last_checkpoint(log_dir / "digits_w4a4"))
    return {k: ckpt.get(k) for k in COMPARED}


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two checkpoint parts differ (tensors compared exactly, dtype included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]")]  # fmt: skip
    return [] if a == b else [path]


def straight(tmp: Path, data_dir: Path) -> dict[str, Any]:
    """The uninterrupted run's final state."""
    log = tmp / "straight"
    proc = _run([], log, log / "digits_w4a4/runs/0", data_dir, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)  # fmt: skip
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {err.decode()[-2000:]}")
    return final_state(log)


def _kill_when(proc: subprocess.Popen, ckpts: Path, mid_write: bool, after: int,
               delay: float) -> str:
    """SIGKILL at the first checkpoint temp file seen (`mid_write`), or `delay` seconds after
    the `after`-th step checkpoint exists: a moment tied to training progress, so it falls
    inside training on a fast machine and a loaded one alike. Returns what happened."""
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if not ckpts.is_dir():
            time.sleep(0.005)
            continue
        names = [p.name for p in os.scandir(ckpts)]
        if mid_write and any(n.endswith(".tmp") for n in names):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed while a checkpoint was being written"
        if not mid_write and sum(n.startswith("s") and n.endswith(".ckpt") for n in names) >= after:
            time.sleep(delay)
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"killed {delay:.3f} s after checkpoint {after} of {STEP_CHECKPOINTS}"
        time.sleep(0.0005 if mid_write else 0.002)
    return "finished before the kill"


def trial(tmp: Path, data_dir: Path, reference: dict, mid_write: bool, seed: int) -> tuple:
    """One kill and resume; returns (what happened, differing keys)."""
    log = tmp / f"trial{seed}"
    run_dir = log / "digits_w4a4/runs/killed"
    proc = _run([], log, run_dir, data_dir, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)  # fmt: skip
    rng = random.Random(seed)
    after, delay = rng.randint(1, STEP_CHECKPOINTS - 5), rng.uniform(0.0, 0.05)
    what = _kill_when(proc, run_dir / "checkpoints", mid_write, after, delay)
    torn = [p.name for p in (run_dir / "checkpoints").glob("*.ckpt")
            if not _loads(p)] if (run_dir / "checkpoints").is_dir() else []  # fmt: skip
    has_ckpt = any((run_dir / "checkpoints").glob("*.ckpt")) if run_dir.is_dir() else False
    resume = ["ckpt_path=last"] if has_ckpt else []  # killed before any checkpoint: start over
    proc = _run(resume, log, log / "digits_w4a4/runs/resumed", data_dir,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        return what, [f"resume failed: {err.decode()[-1500:]}"]
    diffs = differences(reference, final_state(log))
    return what + (f"; torn .ckpt files: {torn}" if torn else ""), diffs


def _loads(path: Path) -> bool:
    try:
        load_checkpoint(path, mmap=True)
        return True
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data_cache")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        reference = straight(tmp, args.data_dir)
        same = mid = 0
        for i in range(args.trials):
            mid_write = i % 2 == 0  # every other trial aims at a checkpoint write
            what, diffs = trial(tmp, args.data_dir, reference, mid_write, seed=i)
            same += not diffs
            mid += "being written" in what
            print(f"trial {i + 1}: {what}: "
                  f"{'bit-identical' if not diffs else 'DIFFERS at ' + ', '.join(diffs[:5])}",
                  flush=True)  # fmt: skip
        print(f"{same} of {args.trials} trials finished bit-identical "
              f"({mid} killed while a checkpoint was being written)")


if __name__ == "__main__":
    main()
