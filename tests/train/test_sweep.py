"""A `-m` sweep across experiments through the real entry point: one summary of every job."""

import csv
import runpy
import sys
from pathlib import Path

import torch

from .conftest import ROOT

MINILM = ["data.batch_size=8", "trainer.max_steps=1", "trainer.val_check_interval=1",
          "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
          "recipe.schedule.calibrate=1", "export.batches=1", "threads=1",
          "trainer.enable_progress_bar=false"]  # fmt: skip


def test_a_sweep_over_two_experiments_writes_one_summary(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py"), "-m",
                                      "experiment=minilm_w8a8_kd,minilm_w4a8_kd", *MINILM,
                                      f"paths.data_dir={data_dir}"])  # fmt: skip
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:
        torch.set_num_threads(1)
    (summary,) = Path("outputs/multiruns").glob("*/summary.csv")
    rows = list(csv.DictReader(summary.open()))
    assert [r["run"] for r in rows] == ["minilm_w8a8_kd/0", "minilm_w4a8_kd/1"]
    assert [r["recipe"] for r in rows] == ["w8a8", "w4a8"]
    assert all(0 < float(r["qat test/cosine"]) <= 1 for r in rows)
