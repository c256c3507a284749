"""Every code block of README.md runs as written.

Commands run in the README's order through the real entry point (`python train.py`, in this
process via `runpy` as `__main__`, or as a subprocess where it must be one: plain DDP re-runs
the command line). To fit the suite, each command gets size limits appended for the
experiment it names (fewer steps, a narrower model): only sizes, never a behaviour switch.
`<run>` stands for the newest run folder the earlier commands made that holds the path.
"""

from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import qat
from qat.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)

DIGITS = [
    "model.args.widths=[8,16]",
    "float_stage.max_steps=20",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=2",
    "recipe.schedule.calibrate=2",
]
SIZES = {
    "digits_w4a4": DIGITS,
    "shakespeare_w4g32a8": [
        "model.args.preset=tiny",
        "data.block_size=32",
        "data.max_eval_blocks=16",
        "float_stage.max_steps=10",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "recipe.schedule.calibrate=2",
    ],
    "minilm_w8a8_kd": [
        "data.batch_size=8",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "recipe.schedule.calibrate=1",
        "export.batches=1",
    ],
}


def _block(lang: str, first_words: str) -> str:
    found = [code for kind, code in BLOCKS if kind == lang and code.startswith(first_words)]
    assert len(found) == 1, f"README has {len(found)} {lang} blocks starting {first_words!r}"
    return found[0]


def test_every_readme_block_is_one_this_file_runs():
    """A new block must get a test here: the blocks are listed by language and first words."""
    heads = [(kind, code.split("\n")[0][:30]) for kind, code in BLOCKS]
    assert heads == [
        ("bash", "make train   # the main job"),
        ("bash", ".venv/bin/python train.py     "),
        ("yaml", "rules:"),
        ("python", "import qat"),
        ("python", "import torch"),
        ("bash", ".venv/bin/python train.py task"),
        ("python", "import torch"),
    ], heads


def test_setup_block_is_the_makefile():
    """`make train` / `make test` are the set-up (CI runs `make test` itself): check they are
    the commands this file runs, the default `train.py` and the ruff + pytest suite."""
    block = _block("bash", "make train")
    assert "make train" in block and "make test" in block
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^train: .*\n\t\$\(PY\) train\.py \$\(ARGS\)$", make, re.M)
    assert re.search(r"^test: .*\n\t\$\(PY\) -m ruff check \.\n\t\$\(PY\) -m pytest", make, re.M)


def test_recipe_block_is_a_valid_recipe_for_a_cnn_and_a_gpt():
    recipe = qat.Recipe.from_dict(yaml.safe_load(_block("yaml", "rules:")))
    gpt = qat.plan(build_model("gpt", preset="tiny", vocab_size=32), recipe)
    assert "lm_head" in [lp.name for lp in gpt.layers if lp.ignored]
    with pytest.warns(UserWarning, match="lm_head"):  # the CNN has no lm_head to ignore
        cnn = qat.plan(build_model("cnn", widths=[8, 16], num_classes=10), recipe)
    assert len(cnn.quantized()) == len(cnn.layers) and cnn.bn_pairs


@pytest.mark.parametrize("first", ["import qat", "import torch\nfrom qat.quant",
                                   "import torch\nimport qat"])
def test_python_block_runs(first, tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    code = _block("python", first)
    exec(compile(code, f"README.md block {first!r}", "exec"), {"__name__": "__readme__"})


def _commands(first: str) -> list[list[str]]:
    out = []
    for line in _block("bash", first).splitlines():
        args = shlex.split(line.split("  #")[0])
        assert args[:2] == [".venv/bin/python", "train.py"], line
        out.append(args[2:])
    return out


def _newest(pattern: str) -> str:
    found = sorted(Path().glob(pattern), key=lambda p: p.stat().st_mtime)
    assert found, f"no {pattern} made by the commands before"
    return str(found[-1])


def _fill(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if "<run>" in a:
            key, value = a.split("=", 1)
            a = f"{key}={_newest(value.replace('<run>', '*'))}"
        out.append(a)
    return out


def _launched(args: list[str]) -> bool:
    """Lightning's launcher starts the other processes by running the command line again."""
    return "trainer=ddp_cpu" in args or "trainer=fsdp_cpu" in args


def _failure(stderr: str) -> str:
    """The first traceback and the end of a launched run's stderr: when one rank dies, the
    others' "connection closed" errors come last and the cause first."""
    first = stderr.find("Traceback")
    head = stderr[first:first + 3000] + "\n...\n" if 0 <= first < len(stderr) - 3000 else ""
    return head + stderr[-3000:]


def _run(args: list[str], data_dir: Path, capfd) -> str:
    exp = next((a.split("=")[1] for a in args if a.startswith("experiment=")), "digits_w4a4")
    argv = [*_fill(args), *SIZES[exp], "threads=1", f"paths.data_dir={data_dir}"]
    if _launched(args):  # DDP and FSDP re-run the command line: a process of its own
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, _failure(proc.stderr)
        return proc.stdout + proc.stderr
    sys.argv = [str(ROOT / "train.py"), *argv]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), capfd.readouterr().err[-3000:]
    finally:
        torch.set_num_threads(1)
    out = capfd.readouterr()
    return out.out + out.err


def _check_console(args: list[str], text: str) -> None:
    for noise in ("Tip", "litlogger", "litmodels", "v_num", "Epoch ", "GPU available",
                  "[INFO]", "Traceback", "Loading weights"):
        assert noise not in text, (args, noise, text[-3000:])
    jobs = 3 if "-m" in args else 1
    if _launched(args):  # rank 1 trains, then leaves the rest to rank 0
        assert text.count("training done on this rank; rank 0 evaluates") == 1, text[-3000:]
    if "task=ptq" in args:  # no training: the quantized model is reported as "ptq"
        assert text.count("ptq: val") == 1 and "qat: val" not in text, (args, text[-3000:])
        assert "GPTQ: " in text if "ptq=gptq" in args else "GPTQ" not in text
    elif "task=sensitivity" in args:  # a scan and a written recipe, no training
        assert text.count("sensitivity: ") == 1 and "mixed_recipe.yaml" in text, text[-3000:]
        return
    elif "task=eval" not in args and "task=export" not in args:
        assert text.count("qat: val") == jobs, (args, text[-3000:])
        assert ("GPTQ: " in text) == ("recipe.init=gptq" in args), (args, text[-3000:])
    if "task=eval" not in args and "task=export" not in args:
        assert text.count("outputs:") == jobs and "metrics" in text


def test_readme_commands_run_in_order(tmp_path, monkeypatch, data_dir, capfd):
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # recipe=configs/recipe/w8a8.yaml
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    capfd.readouterr()
    for args in _commands(".venv/bin/python train.py     ") + _commands(
        ".venv/bin/python train.py task"
    ):
        _check_console(args, _run(args, data_dir, capfd))
    runs = Path("outputs")
    sweep = Path(_newest("outputs/multiruns/*/summary.csv")).parent
    assert (sweep / "summary.md").read_text().count("\n") == 2 + 3  # header, rule, 3 recipes
    ddp = Path(_newest("outputs/digits_w4a4/runs/*/train_ddp_process_1.log")).parent
    assert (ddp / "metrics.json").is_file() and (ddp / "export" / "qat").is_dir()
    assert list(runs.glob("digits_w4a4/runs/*/export/model.onnx"))
    assert list(runs.glob("shakespeare_w4g32a8/runs/*/export/model.gguf"))
    assert list(runs.glob("minilm_w8a8_kd/runs/*/eval.json"))
