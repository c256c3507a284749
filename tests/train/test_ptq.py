"""`task=ptq` (round-to-nearest or GPTQ, no training) and QAT started from GPTQ's codes,
through the real configs on the character-level Shakespeare GPT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qat.train.checkpoint import load_checkpoint
from qat.train.run import run
from tests.train.conftest import compose_run_config

GPT = [
    "experiment=shakespeare_w4g32a8",
    "model.args.preset=tiny",
    "data.block_size=32",
    "data.batch_size=16",
    "float_stage.max_steps=60",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=4",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "threads=1",
    "recipe.schedule.calibrate=4",
]


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory, data_dir):
    """One trained float GPT for every run of this file (`init_from`)."""
    cfg = compose_run_config(tmp_path_factory.mktemp("float"), data_dir,
                             GPT + ["trainer.max_steps=0", "export.enabled=false"])  # fmt: skip
    run(cfg)
    return Path(cfg.paths.output_dir) / "float" / "checkpoints" / "last.ckpt"


def weights(res: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(res["artifacts"]["qat"]) / "weights.safetensors")


def test_ptq_gptq_exports_through_the_gate_and_beats_round_to_nearest(make_cfg, float_ckpt,
                                                                      capsys):  # fmt: skip
    base = GPT + [f"init_from={float_ckpt}", "task=ptq"]
    rtn = run(make_cfg(base, name="rtn"))
    gptq = run(make_cfg(base + ["ptq=gptq"], name="gptq"))
    assert "GPTQ: 15 layers" in capsys.readouterr().out
    for res in (rtn, gptq):
        assert "qat" not in res and res["ptq"] and res["artifacts"]["qat"]
        assert res["export"]["test/ppl"] == pytest.approx(res["ptq"]["test/ppl"], rel=1e-3)
        assert not (Path(res["run_dir"]) / "checkpoints").exists()  # nothing trained
    assert gptq["ptq"]["test/ppl"] < rtn["ptq"]["test/ppl"]
    assert gptq["ptq"]["test/ppl"] > gptq["float"]["test/ppl"]


def test_qat_from_gptq_starts_on_gptqs_codes_and_keeps_its_weight_scales(make_cfg, float_ckpt):
    ptq = run(make_cfg(GPT + [f"init_from={float_ckpt}", "task=ptq", "ptq=gptq"], name="ptq"))
    zero = run(make_cfg(GPT + [f"init_from={float_ckpt}", "recipe.init=gptq",
                               "trainer.max_steps=0"], name="zero"))  # fmt: skip
    a, b = weights(ptq), weights(zero)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # LSQ weight scales start at GPTQ's and then belong to the optimizer; observers stay off.
    trained = run(make_cfg(GPT + [f"init_from={float_ckpt}", "recipe.init=gptq"], name="qat"))
    state = load_checkpoint(trained["qat_checkpoint"])["state_dict"]
    obs = {k: v for k, v in state.items() if k.endswith("weight_quant.observer_enabled")}
    assert obs and not any(bool(v) for v in obs.values())


def test_ptq_refusals_name_the_fix(make_cfg, float_ckpt):
    with pytest.raises(ValueError, match=r"recipe.*init: got 'gptq2'; allowed: rtn, gptq"):
        run(make_cfg(GPT + ["recipe.init=gptq2"]))
    with pytest.raises(ValueError, match=r"GPTQ needs calibration batches"):
        run(make_cfg(GPT + ["task=ptq", "ptq=gptq", "recipe.schedule.calibrate=0"]))
    with pytest.raises(ValueError, match=r"ptq.percdamp: got 0"):
        run(make_cfg(GPT + ["task=ptq", "ptq=gptq", "ptq.percdamp=0"]))
