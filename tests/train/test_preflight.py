"""Bad input is refused before any data loads or any step runs, in one line naming the fix."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

import qat.train.run as runmod
from qat.train.model_spec import STAND_IN_SIZE
from qat.train.preflight import preflight
from qat.train.run import run

from .conftest import ROOT, TINY


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if a run gets as far as loading data."""

    def loaded(cfg):
        raise AssertionError("data was loaded before the bad input was refused")

    monkeypatch.setattr(runmod, "build_data", loaded)


BAD = [
    (["trainer.max_steps=-5"], r"^trainer\.max_steps: got -5; allowed: an integer >= 0"),
    (["float_stage.max_steps=1.5"], r"^float_stage\.max_steps: got 1\.5; allowed"),
    (["trainer.val_check_interval=0"], r"^trainer\.val_check_interval: got 0; allowed"),
    (["data.batch_size=0"], r"^data\.batch_size: got 0; allowed: an integer >= 1"),
    (["module.lr=-1e-3"], r"^module\.lr: got -0\.001; allowed: a number in \(0"),
    (["module.optimizer=adam"], r"^module\.optimizer: got 'adam'; allowed: adamw, sgd"),
    (["export.formats=[qat,tflite]"], r"^export\.formats: got 'tflite'; allowed: qat, onnx"),
    (["export.formats=[gguf]"], r"^export\.formats: gguf needs a Llama-family LM"),
    (["recipe.rules.0.weight.bits=9"],
     r"^recipe \(w4a4_lsq\): rules\[0\]\.weight\.bits: got 9; allowed: an integer from 2 to 8"),
    # A recipe that cannot fit the model: 5-wide groups on 8-channel convs.
    (["recipe.rules.0.weight.granularity=per_group", "+recipe.rules.0.weight.group_size=5"],
     r"^recipe=w4a4_lsq on model cnn: rules\[0\]\+rules\[1\]\.weight\.group_size: got 5; "
     r"allowed: a "
     r"divisor of the input size 9 .*\(module 'conv1', Conv2d\)"),
    (["+recipe.rules.0.match.names=[nothing.here]"],
     r"^recipe=w4a4_lsq on model cnn: rules\[0\]\.match: matches no quantizable module"),
    (["task=eval"], r"^task=eval needs ckpt_path=<checkpoint> \(or last\) or artifact=<dir>"),
    (["task=export"], r"^task=export needs ckpt_path=<checkpoint>"),
    (["task=eval", "artifact=/nonexistent/dir"], r"^artifact=/nonexistent/dir: .*manifest\.json"),
    (["init_from=/nonexistent.ckpt"], r"^init_from=/nonexistent\.ckpt does not exist"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_one_line_before_any_data(make_cfg, no_data, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        run(make_cfg(TINY + overrides))
    assert "\n" not in str(err.value)


def test_a_text_file_named_ckpt_is_named_as_such(make_cfg, no_data, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("these are my notes, not a checkpoint\n")
    for command in ("train", "eval", "export"):
        with pytest.raises(ValueError, match=r"^ckpt_path: checkpoint .*notes\.ckpt is "
                           r"unreadable or truncated: it is a text file, not a checkpoint "
                           r"written by torch\.save"):
            run(make_cfg(TINY + [f"task={command}", f"ckpt_path={text}"]))


def test_auto_sizes_get_a_stand_in_for_planning(make_cfg):
    job = preflight(make_cfg(["experiment=shakespeare_w4g32a8"]))
    assert job.model.args["vocab_size"] == "auto"
    head = next(lp for lp in job.plan.layers if lp.name == "lm_head")  # (vocab, d): planned
    assert head.quantized and head.specs["weight"].granularity == "per_group"
    assert job.model.probe().lm_head.weight.shape[0] == STAND_IN_SIZE
    # Planning leaves the global RNG alone: the real model is built after seeding.
    before = torch.get_rng_state()
    preflight(make_cfg(TINY))
    assert torch.equal(before, torch.get_rng_state())


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_recipe_file_with_field_overrides(make_cfg, tmp_path):
    path = _write(tmp_path, "mine.yaml", "rules:\n  - match: {types: [Linear]}\n"
                  "    weight: {bits: 6}\nschedule: {calibrate: 3}\n")
    job = preflight(make_cfg(TINY + [f"recipe={path}", "recipe.schedule.calibrate=7"]))
    assert job.recipe.schedule.calibrate == 7
    assert [lp.name for lp in job.plan.quantized()] == ["head"]
    assert job.plan.quantized()[0].specs["weight"].bits == 6


def test_recipe_file_syntax_error_is_one_line_at_composition(make_cfg, tmp_path):
    text = "rules:\n  - match: {types: [Linear]\n    weight: {bits: 8}\n"
    path = _write(tmp_path, "bad.yaml", text)
    message = r"^recipe file .*bad\.yaml:3:5: invalid YAML: expected ',' or '\}'"
    with pytest.raises(ConfigCompositionException, match=message) as err:
        make_cfg(TINY + [f"recipe={path}"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,message", [
    ("rules:\n  - match: {types: [Linear]}\n    weight: {bits: 9}\n",
     r"^recipe \(.*bad\.yaml\): rules\[0\]\.weight\.bits: got 9; allowed"),
    ("rules:\n  - match: {types: [Linear]}\n    wieght: {bits: 8}\n",
     r"^recipe \(.*bad\.yaml\): rules\[0\]\.wieght: got 'wieght'; allowed: match, weight"),
])
def test_recipe_file_field_errors_name_the_file(make_cfg, no_data, tmp_path, text, message):
    # Fields are checked after the command line's overrides, which can fix them.
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ValueError, match=message) as err:
        run(make_cfg(TINY + [f"recipe={path}"]))
    assert "\n" not in str(err.value)


def test_missing_recipe_file_and_unknown_name(make_cfg, tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"recipe file .*gone\.yaml does not "
                       r"exist \(recipe= takes a name from configs/recipe/ or a path"):
        make_cfg(TINY + [f"recipe={tmp_path}/gone.yaml"])
    with pytest.raises(Exception, match=r"Could not find 'recipe/w8a9'"):
        make_cfg(TINY + ["recipe=w8a9"])


def _cli(args, tmp_path, **env):
    return subprocess.run(
        [sys.executable, "train.py", *args, f"paths.log_dir={tmp_path}/logs",
         f"paths.data_dir={tmp_path}/data"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )


def test_the_command_line_prints_one_line_and_the_trace_on_request(tmp_path):
    proc = _cli(["trainer.max_steps=-5"], tmp_path)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-2].startswith("trainer.max_steps: got -5; allowed: an integer >= 0"), lines
    assert lines[-1] == "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack " \
                        "trace."
    assert "Traceback" not in proc.stderr and not (tmp_path / "data").exists()
    full = _cli(["trainer.max_steps=-5"], tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and "preflight.py" in full.stderr


def test_a_file_of_ones_own_wins_over_a_shipped_recipe_of_the_same_name(make_cfg, tmp_path,
                                                                         monkeypatch):
    _write(tmp_path, "w8a8.yaml", "rules:\n  - match: {types: [Linear]}\n    weight: {bits: 6}\n")
    monkeypatch.chdir(tmp_path)
    job = preflight(make_cfg(TINY + ["recipe=w8a8.yaml"]))
    assert [lp.specs["weight"].bits for lp in job.plan.quantized()] == [6]
    shipped = preflight(make_cfg(TINY + ["recipe=w8a8"]))
    assert len(shipped.plan.quantized()) == 7  # the name alone is the shipped recipe


def test_preflight_imports_no_lightning():
    code = ("import sys, qat.train.preflight, qat.train.recipe_files; "
            "assert not [m for m in sys.modules if m.startswith(('lightning', 'pytorch_"
            "lightning'))], 'lightning imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_checkpoints_written_before_the_objective_rename_still_check():
    from qat.train.checkpoint import check_meta, objective_of

    old = {"task": "classification", "model": {"builder": "cnn"}}  # the key before the rename
    assert objective_of(old) == "classification"
    check_meta(old, {"objective": "classification", "model": {"builder": "cnn"}})
    with pytest.raises(ValueError, match=r"^checkpoint mismatch in 'objective': objective: "
                       r"checkpoint 'classification', this run 'causal_lm'"):
        check_meta(old, {"objective": "causal_lm"})


def test_onnx_refuses_llama_cpp_activation_blocks_before_training(make_cfg):
    with pytest.raises(ValueError, match=r"^export\.formats: onnx cannot quantize .*'s input as "
                       r"recipe=q4_0_llama asks \(8b per_group\(32\) sym dynamic narrow "
                       r"scale=fp16 llama_cpp\); drop onnx"):  # fmt: skip
        preflight(make_cfg(["experiment=shakespeare_w4g32a8", "recipe=q4_0_llama",
                            "export.formats=[qat,onnx]"]))  # fmt: skip
