"""Killed runs, hostile checkpoints, numerical and disk faults."""

import os
import time

import pytest
import torch

import qat
from qat.models.registry import build_model
from qat.train.checkpoint import find_last_checkpoint, load_checkpoint
from qat.train.module import QATModule
from qat.train.trainer import AtomicCheckpointIO, CheckpointWriteError
from tests.soak import kill_resume

from .conftest import ROOT, TINY


def test_sigkill_at_random_instants_and_mid_write_resumes_bit_identical(tmp_path, data_dir):
    """Two kills of a real run: while a checkpoint is being written, and at a random instant;
    each resumed with ckpt_path=last ends with the uninterrupted run's weights, optimizer,
    schedule, quantizer and RNG state (`python -m tests.soak.kill_resume` runs 20)."""
    reference = kill_resume.straight(tmp_path, data_dir)
    assert reference["global_step"] == 40 and reference["optimizer_states"]
    for mid_write, seed in ((True, 0), (False, os.getpid())):
        what, diffs = kill_resume.trial(tmp_path, data_dir, reference, mid_write, seed)
        assert diffs == [], (what, diffs)
        assert "killed" in what, what
        assert "torn" not in what, what


def test_ckpt_path_last_skips_a_newer_torn_or_foreign_file(tmp_path, caplog):
    ckpts = tmp_path / "runs" / "a" / "checkpoints"
    ckpts.mkdir(parents=True)
    good = ckpts / "last.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(3)}, "global_step": 4}, good)
    time.sleep(0.01)
    torn = ckpts / "s8.ckpt"
    torn.write_bytes(good.read_bytes()[:200])  # a copy cut short (not our atomic writer)
    (ckpts / "notes.ckpt").write_text("not a checkpoint")
    os.utime(ckpts / "notes.ckpt", (time.time() + 5, time.time() + 5))  # the newest of all
    with caplog.at_level("WARNING"):
        assert find_last_checkpoint(tmp_path) == good
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("ckpt_path=last: skipped 2 newer unreadable checkpoint(s): ")
    assert "notes.ckpt (it is a text file" in line and "s8.ckpt (it is truncated" in line
    good.unlink()
    with pytest.raises(FileNotFoundError, match=r"no checkpoints/last\.ckpt under .* that "
                       r"loads \(2 unreadable"):
        find_last_checkpoint(tmp_path)


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
