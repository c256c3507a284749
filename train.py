"""Train, evaluate or export with fake quantization. Thin: Hydra composes, `qat.train.run` runs.

python train.py                                  # the default digits experiment
python train.py experiment=shakespeare_w4g32a8 recipe=w8a8
python train.py -m recipe=fp32,w8a8,w4a4_lsq     # sweep, summary in the sweep dir
python train.py ckpt_path=last                   # resume the latest run of the experiment
python train.py task=eval ckpt_path=PATH
"""

from __future__ import annotations

import os
import warnings

import hydra
from omegaconf import DictConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from qat.train.run import monitored_value, run

    results = run(cfg)
    return monitored_value(results, str(cfg.monitor).split("/")[-1])  # for Hydra sweepers


if __name__ == "__main__":
    main()
