import json
from pathlib import Path

import pytest
import torch
import yaml

import qat.train.checkpoint as checkpoint_mod
from qat.train.checkpoint import load_checkpoint, model_state
from qat.train.preflight import preflight
from qat.train.run import run

from .conftest import TINY

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "configs/experiment").glob("*.yaml"))


def _parent(path: Path) -> str | None:
    """The experiment `path` builds on (a plain name in its defaults list), if any."""
    defaults = yaml.safe_load(path.read_text()).get("defaults") or []
    return next((d for d in defaults if isinstance(d, str)
                 and (path.parent / f"{d}.yaml").is_file()), None)  # fmt: skip


# An experiment built on another (smollm2_q4_0_lora: smollm2_q4_0 with a LoRA recipe and its
# learning rate) runs its parent's road, which is smoke-run (SmolLM2's takes 4 minutes); it is
# planned against its model here, and its recipe trains in tests/train/test_lora.py.
ROOTS = [p for p in EXPERIMENTS if _parent(p) is None]
DERIVED = [p for p in EXPERIMENTS if _parent(p) is not None]


def test_default_experiment_trains_float_then_qat_and_writes_outputs(make_cfg):
    cfg = make_cfg(TINY)
    res = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert 0.5 < res["float"]["test/acc"] <= 1.0  # 40 float steps already learn digits
    assert 0.5 < res["qat"]["test/acc"] <= 1.0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["qat"]["test/acc"] == res["qat"]["test/acc"]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["qat_meta"]["recipe"]["rules"][0]["weight"]["learn"] == "lsq"
    assert ckpt["global_step"] == 20
    # Quantizer state is in the checkpoint: scales, switches, calibration flags.
    sd = model_state(ckpt)
    assert sd["conv1.weight_quant.calibrated"].item() is True
    # The CSV log has the per-quantizer clip fraction and scale.
    metrics_csv = next(out.glob("logs/qat/**/metrics.csv")).read_text()
    assert "quant/conv1.weight_quant/scale" in metrics_csv
    assert "quant/head.input_quant/clip" in metrics_csv


def test_resume_is_bit_identical_to_an_uninterrupted_run(make_cfg, monkeypatch):
    """2N steps straight vs N steps, interruption, resume: same weights and quantizer state.
    The interruption (step N=12) falls between calibration and the observer freeze (step 18).
    With distillation on, the resumed run must also get the trained float teacher back."""
    common = TINY + [
        "trainer.max_steps=24",
        "trainer.val_check_interval=6",
        "float_stage.max_steps=8",
        "module.kd_weight=0.5",
        "recipe.schedule.calibrate=2",
        "recipe.schedule.freeze_observers=0.75",
        "recipe.schedule.freeze_bn=0.75",
        "callbacks.model_checkpoint.every_n_train_steps=12",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.filename='step{step}'",
        "recipe=w8a8",  # EMA activation observers: state that must survive the restart
    ]
    cfg = make_cfg(common, name="straight")
    run(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    mid = ckpts / "step12.ckpt"
    assert mid.is_file(), sorted(p.name for p in ckpts.iterdir())
    straight = model_state(load_checkpoint(ckpts / "last.ckpt"))

    cfg2 = make_cfg(common + [f"ckpt_path={mid}"], name="resumed")
    reads = []

    def counted(p, mmap=False):
        reads.append((Path(p), mmap))
        return load_checkpoint(p, mmap=mmap)

    monkeypatch.setattr(checkpoint_mod, "load_checkpoint", counted)
    run(cfg2)
    # Our code opens it once, tensors memory-mapped (preflight reads the metadata);
    # Lightning alone reads the weights.
    assert [r for r in reads if r[0] == mid] == [(mid, True)]
    resumed = model_state(load_checkpoint(Path(cfg2.paths.output_dir) / "checkpoints/last.ckpt"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # The observers really were frozen by the schedule, after the resume point.
    assert not resumed["blocks.0.conv1.input_quant.observer_enabled"].item()


def test_eval_task_reproduces_the_training_metrics(make_cfg):
    cfg = make_cfg(TINY)
    res = run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ev = run(
        make_cfg(
            TINY + ["task=eval", f"ckpt_path={ckpt}", "eval.without_fake_quant=true"], name="eval"
        )
    )
    assert ev["fake_quant"]["test/acc"] == pytest.approx(res["qat"]["test/acc"])
    assert "test/acc" in ev["without_fake_quant"]


def test_resume_with_another_recipe_names_the_mismatch(make_cfg):
    cfg = make_cfg(TINY + ["float_stage.max_steps=0", "trainer.max_steps=4"])
    run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"checkpoint mismatch in 'recipe'"):
        run(make_cfg(TINY + ["recipe=w8a8", f"ckpt_path={ckpt}"], name="other"))
    with pytest.raises(ValueError, match=r"checkpoint mismatch in 'model'"):
        run(make_cfg(TINY + ["model.args.widths=[8,8]", f"ckpt_path={ckpt}"], name="other2"))
    # The message names the one field that differs, not two whole recipes.
    with pytest.raises(
        ValueError, match=r"recipe\.schedule\.calibrate: checkpoint 20, this run 10\. Use the same"
    ):
        run(make_cfg(TINY + ["recipe.schedule.calibrate=10", f"ckpt_path={ckpt}"], name="o3"))
    # Evaluating it with another objective's config is refused before any layer sees the data.
    with pytest.raises(ValueError, match=r"made for objective 'classification' with model builder "
                       r"'cnn', but this config has module.objective='causal_lm'"):
        run(make_cfg(["task=eval", f"ckpt_path={ckpt}", "experiment=shakespeare_w4g32a8"],
                     name="o4"))


def test_bad_task_and_missing_checkpoint_are_clear_errors(make_cfg):
    allowed = "train, ptq, sensitivity, eval, export"
    with pytest.raises(ValueError, match=rf"task: got 'fit'; allowed: {allowed}"):
        run(make_cfg(TINY + ["task=fit"]))
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=nope\.ckpt does not exist"):
        run(make_cfg(TINY + ["ckpt_path=nope.ckpt"]))
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no checkpoints/last\.ckpt"):
        run(make_cfg(TINY + ["ckpt_path=last"]))


@pytest.mark.parametrize("path", DERIVED, ids=lambda p: p.stem)
def test_every_derived_experiment_plans_against_its_model(make_cfg, path):
    job = preflight(make_cfg([f"experiment={path.stem}", "++trainer.fast_dev_run=true"]))
    parent = preflight(make_cfg([f"experiment={_parent(path)}", "++trainer.fast_dev_run=true"]))
    assert job.plan.quantized() and job.model.builder == parent.model.builder
    assert job.objective == parent.objective


@pytest.mark.parametrize("path", ROOTS, ids=lambda p: p.stem)
def test_every_experiment_smoke_runs(make_cfg, path):
    overrides = [
        f"experiment={path.stem}",
        "++trainer.fast_dev_run=true",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "threads=1",
        "data.batch_size=4",
    ]
    if path.stem.startswith("shakespeare"):
        overrides += ["model.args.preset=tiny", "data.block_size=32"]
    res = run(make_cfg(overrides))
    assert res["qat"], res


def test_init_from_a_float_checkpoint_skips_float_training(make_cfg):
    cfg = make_cfg(TINY + ["trainer.max_steps=4"])
    first = run(cfg)
    float_ckpt = Path(cfg.paths.output_dir) / "float" / "checkpoints" / "last.ckpt"
    second = run(
        make_cfg(TINY + ["trainer.max_steps=4", f"init_from={float_ckpt}"], name="from_float")
    )
    assert second["float"]["test/acc"] == pytest.approx(first["float"]["test/acc"])
    qat_ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"is a QAT checkpoint; init_from takes the float"):
        run(make_cfg(TINY + [f"init_from={qat_ckpt}"], name="wrong"))
    # A float checkpoint evaluates under "float", not "fake_quant".
    ev = run(make_cfg(TINY + ["task=eval", f"ckpt_path={float_ckpt}"], name="eval_float"))
    assert "fake_quant" not in ev
    assert ev["float"]["test/acc"] == pytest.approx(first["float"]["test/acc"])
