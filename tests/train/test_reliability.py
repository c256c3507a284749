"""Killed runs, hostile checkpoints, numerical and disk faults."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import qat
from qat.models.registry import build_model
from qat.train.checkpoint import find_last_checkpoint, load_checkpoint, model_state
from qat.train.module import QATModule
from qat.train.trainer import AtomicCheckpointIO, CheckpointWriteError

from .conftest import ROOT, TINY

KILL_RUN = TINY + [
    "float_stage.max_steps=0",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "recipe=w8a8",
    "recipe.schedule.freeze_observers=0.6",
    "recipe.schedule.freeze_bn=0.6",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.filename='s{step}'",
    "logger=none",
]


def _cmd(extra, log_dir, data_dir):
    return [
        sys.executable,
        "train.py",
        *KILL_RUN,
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
        *extra,
    ]


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path, data_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight_dir = tmp_path / "straight"
    subprocess.run(
        _cmd([f"hydra.run.dir={straight_dir}"], tmp_path / "a", data_dir),
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    straight = model_state(load_checkpoint(straight_dir / "checkpoints" / "last.ckpt"))

    kill_step = random.Random(os.getpid()).choice([4, 8, 12, 16, 20, 24])
    logs = tmp_path / "b"
    proc = subprocess.Popen(
        _cmd([f"hydra.run.dir={logs}/digits_w4a4/runs/killed"], logs, data_dir),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = logs / "digits_w4a4/runs/killed/checkpoints" / f"s{kill_step}.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run ended before the chosen checkpoint"
    newest = find_last_checkpoint(logs / "digits_w4a4")
    assert load_checkpoint(newest)["global_step"] >= kill_step  # whole, never torn

    subprocess.run(
        _cmd(["ckpt_path=last", f"hydra.run.dir={logs}/digits_w4a4/runs/resumed"], logs, data_dir),
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    resumed = model_state(load_checkpoint(logs / "digits_w4a4/runs/resumed/checkpoints/last.ckpt"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), (k, kill_step)


def test_checkpoint_with_a_pickle_payload_is_refused(tmp_path, make_cfg):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "qat_meta": Payload()}, evil)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.ckpt.*never unpickles"):
        load_checkpoint(evil)
    from qat.train.run import run

    with pytest.raises(ValueError, match="refusing to load"):
        run(make_cfg(TINY + [f"ckpt_path={evil}"]))
    with pytest.raises(ValueError, match="refusing to load"):
        run(make_cfg(TINY + ["task=eval", f"ckpt_path={evil}"], name="eval"))
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(1000)}}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"bad\.ckpt is unreadable or truncated"):
        load_checkpoint(bad)


def test_nan_loss_stops_with_the_step_and_the_suspicious_quantizer():
    model = qat.prepare(build_model("cnn", widths=[8, 16]), ROOT / "configs/recipe/w8a8.yaml")
    batch = {"x": torch.randn(8, 1, 8, 8), "y": torch.randint(0, 10, (8,))}
    qat.quant.calibrate(model, [batch["x"]], 1)
    module = QATModule(model, "classification", num_classes=10)
    with torch.no_grad():
        model.head.input_quant.scale.fill_(float("inf"))  # a broken scale
    model.apply(qat.quant.disable_observer)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0.*head\.input_quant"):
        module.training_step(batch, 0)


def test_observers_refuse_nan_batches():
    model = qat.prepare(build_model("cnn", widths=[8, 16]), ROOT / "configs/recipe/w8a8.yaml")
    x = torch.randn(4, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"observer conv1\.input_quant got NaN input"):
        model(x)


def test_full_disk_during_checkpointing_leaves_nothing_partial(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt: No space left on device"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(10)}}, path)
    assert list(path.parent.iterdir()) == []


def test_read_only_output_dir_is_a_clear_error(tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointWriteError, match=r"Read-only file system.*resume"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "x.ckpt")
