"""Compose the real Hydra configs with tiny limits, writing to tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Small and fast: a narrow CNN, short runs, no progress bar.
TINY = [
    "model.args.widths=[8,16]",
    "data.batch_size=32",
    "float_stage.max_steps=40",
    "float_stage.lr=0.01",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "threads=1",
    "log_quant_every_n_steps=5",
]


def compose_run_config(tmp_path: Path, data_dir: Path, overrides: list[str], name: str = "run"):
    """The composed `configs/train.yaml` with `overrides`, its outputs under `tmp_path`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(
            tmp_path / "logs" / str(cfg.hydra.runtime.choices.experiment) / "runs" / name
        )
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    """`make_cfg(overrides, name="run")` -> a composed config whose outputs go to tmp_path."""
    yield lambda overrides, name="run": compose_run_config(tmp_path, data_dir, overrides, name)
    GlobalHydra.instance().clear()
