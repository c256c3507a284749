"""The CSV metrics log: rewritten atomically, a full disk one clear error."""

import os

import pytest

from qat.io import WriteError
from qat.train.logs import CSVLogger


def test_new_columns_rewrite_the_whole_file_and_keep_every_row(tmp_path):
    log = CSVLogger(tmp_path, name="logs")
    log.log_metrics({"loss": 1.0}, step=0)
    log.save()
    log.log_metrics({"loss": 0.5, "val/acc": 0.9}, step=1)  # a new column mid-run
    log.save()
    lines = open(log.experiment.metrics_file_path).read().splitlines()
    assert lines == ["loss,step,val/acc", "1.0,0,", "0.5,1,0.9"]
    assert sorted(os.listdir(log.log_dir)) == ["metrics.csv"]  # no temp file left


def test_full_disk_names_the_log_and_leaves_the_last_whole_file(tmp_path, monkeypatch):
    log = CSVLogger(tmp_path, name="logs")
    log.log_metrics({"loss": 1.0}, step=0)
    log.save()
    before = open(log.experiment.metrics_file_path).read()

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    log.log_metrics({"loss": 0.5}, step=1)
    with pytest.raises(WriteError, match=r"could not write metrics log .*metrics\.csv: No "
                       r"space left on device"):
        log.save()
    assert open(log.experiment.metrics_file_path).read() == before
    assert sorted(os.listdir(log.log_dir)) == ["metrics.csv"]
    log.finalize("failed")  # a failed run reports its own error: no second one from here
    with pytest.raises(WriteError):
        log.log_metrics({"loss": 0.2}, step=2)
        log.finalize("success")
