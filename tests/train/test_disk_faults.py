"""Disk faults in a real `train.py` run: a full disk and a read-only folder end in one line
naming the file, leave nothing partial, and the last good checkpoint still resumes."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qat.train.checkpoint import find_last_checkpoint, load_checkpoint
from tests.soak import kill_resume

from .conftest import ROOT

# The kill test's tiny run (Hydra takes the last value of a key), writing logs and an export.
RUN = [*kill_resume.RUN, "model.args.widths=[8,16]", "recipe.schedule.calibrate=2",
       "callbacks.model_checkpoint.every_n_train_steps=4", "logger=csv", "export.enabled=true"]


def _train(args, data_dir, **kw):
    return subprocess.run(
        [sys.executable, "train.py", *RUN, f"paths.data_dir={data_dir}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kw,
    )  # fmt: skip


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small file system at `path` (needs mount rights: root in a VM or container)."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:  # fmt: skip
        yield False
        return
    try:
        if read_only:
            (path / "logs").mkdir()
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("Set the environment variable HYDRA_FULL_ERROR=1"), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-2]


def _limit_file_size(limit: int):
    def apply() -> None:  # a write past `limit` bytes fails with EFBIG instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_in_a_real_run_ends_cleanly_and_the_last_good_checkpoint_resumes(
    tmp_path, data_dir
):
    full = tmp_path / "full"
    with tmpfs(full, "400k") as mounted:
        if mounted:  # checkpoints of ~150 KB: the disk fills after a few of them
            proc = _train([f"paths.log_dir={full}"], data_dir)
            cause = "No space left on device"
        else:  # no mount rights: a per-file size limit fails the first checkpoint the same way
            full.mkdir(exist_ok=True)
            proc = _train([f"paths.log_dir={full}"], data_dir,
                          preexec_fn=_limit_file_size(100_000))  # fmt: skip
            cause = "File too large"
        assert proc.returncode == 1
        line = _error_line(proc.stderr)
        assert line.startswith(f"could not write checkpoint {full}/digits_w4a4/runs/"), line
        assert f".ckpt: {cause}. Nothing partial was left behind" in line, line
        files = [p for p in full.rglob("*") if p.is_file()]
        assert not [p for p in files if p.name.endswith(".tmp")], files  # no temp files left
        for ckpt in (p for p in files if p.suffix == ".ckpt"):
            load_checkpoint(ckpt)  # every checkpoint left is whole
        if not mounted:
            return
        last = find_last_checkpoint(full / "digits_w4a4")
        step = load_checkpoint(last)["global_step"]
        assert 0 < step < 40
        resumed = tmp_path / "resumed"
        proc = _train([f"ckpt_path={last}", f"hydra.run.dir={resumed}",
                       f"paths.log_dir={tmp_path}/logs"], data_dir)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == 40
    assert (resumed / "metrics.json").is_file()


def test_read_only_log_folder_is_one_line(tmp_path, data_dir):
    ro = tmp_path / "ro"
    with tmpfs(ro, "1m", read_only=True) as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("root without mount rights cannot make a read-only folder")
            (ro / "logs").mkdir(parents=True)
            (ro / "logs").chmod(0o555)
        proc = _train([f"paths.log_dir={ro}/logs"], data_dir)
    assert proc.returncode == 1
    line = _error_line(proc.stderr)
    assert line.startswith(f"cannot create the run folder {ro}/logs/digits_w4a4/runs/"), line
    assert "point paths.log_dir (or hydra.run.dir) at a writable location" in line
