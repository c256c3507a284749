"""Train, evaluate or export with fake quantization. Thin: Hydra composes, `qat.train` runs.

python train.py                                  # the default digits experiment
python train.py experiment=shakespeare_w4g32a8 recipe=w8a8
python train.py recipe=path/to/my_recipe.yaml    # a recipe file of one's own
python train.py -m recipe=fp32,w8a8,w4a4_lsq     # sweep, summary in the sweep dir
python train.py ckpt_path=last                   # resume the latest run of the experiment
python train.py task=eval ckpt_path=PATH

A bad config ends in one line naming the key and the fix (HYDRA_FULL_ERROR=1 for the trace).
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# tqdm reads this when first imported (torch imports it): transformers' bars loading a GGUF
# stay off. qat's own bars are rich's.
os.environ.setdefault("TQDM_DISABLE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qat.train.errors import EXPECTED, RunError, one_line  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Checked before Lightning is imported (~7 s) and before any data loads.
    from qat.train.preflight import preflight

    try:
        job = preflight(cfg)
        from qat.train.run import monitored_value, run

        results = run(job)
    except EXPECTED as e:  # bad input, a failed write, a diverged run: one line
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise RunError(one_line(e)) from e
    return monitored_value(results, str(cfg.monitor).split("/")[-1])  # for Hydra sweepers


if __name__ == "__main__":
    # A log handler that cannot write (a full disk) stays quiet: the run reports the write
    # that failed itself, in one line, instead of a traceback per log record.
    logging.raiseExceptions = False
    main()
