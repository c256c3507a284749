"""Hydra callback: make the run (or sweep) folder before Hydra does, so a folder that cannot
be made (read-only or full disk) is one line naming it, not a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qat.train.errors import RunError


def make_dir(config: DictConfig, key: str) -> None:
    HydraConfig.instance().set_config(config)  # the folder's name reads hydra:runtime.choices
    path = Path(str(OmegaConf.select(config, key)))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        message = (f"cannot create the run folder {path}: {e.strerror}; point paths.log_dir "
                   f"(or {key}) at a writable location with free space")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise RunError(message) from e
        # Hydra turns a callback's exception into a warning and goes on: stop here instead.
        print(f"{message}\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete "
              "stack trace.", file=sys.stderr)
        sys.exit(1)


class RunDirs(Callback):
    """Creates `hydra.run.dir` (single runs) or `hydra.sweep.dir` (`-m`) up front."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_dir(config, "hydra.sweep.dir")
