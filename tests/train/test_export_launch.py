"""Export from the launcher: at the end of training, task=export, task=eval artifact=..."""

import json
from pathlib import Path

import pytest

from qat.train.run import monitored_value, run

from .conftest import TINY


def test_training_exports_and_the_artifact_evaluates_like_the_checkpoint(make_cfg):
    cfg = make_cfg(TINY + ["recipe=w8a8", "export.formats=[qat,onnx]"])
    res = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "export" / "model.onnx").is_file()
    assert res["artifacts"]["onnx_parity"]["top1"] == 1.0
    art = out / "export" / "qat"
    assert (art / "manifest.json").is_file() and (art / "weights.safetensors").is_file()
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["parity"]["output"]["rel"] <= 1e-4
    assert res["export"]["test/acc"] == pytest.approx(res["qat"]["test/acc"], abs=0.01)
    ev = run(make_cfg(TINY + ["task=eval", f"artifact={art}"], name="eval_artifact"))
    assert ev["integer"]["test/acc"] == pytest.approx(res["export"]["test/acc"])
    ck = run(
        make_cfg(TINY + ["task=eval", f"ckpt_path={out}/checkpoints/last.ckpt"], name="eval_ckpt")
    )
    assert ck["fake_quant"]["test/acc"] == pytest.approx(res["qat"]["test/acc"])


def test_task_export_writes_qat_and_gguf_for_the_gpt(make_cfg):
    gpt = [
        "experiment=shakespeare_w4g32a8",
        "model.args.preset=tiny",
        "data.block_size=32",
        "data.batch_size=8",
        "float_stage.max_steps=0",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "threads=1",
        "recipe=w4g32",
        "export.enabled=false",
    ]
    cfg = make_cfg(gpt)
    res = run(cfg)
    assert "export" not in res
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg2 = make_cfg(
        gpt + ["task=export", f"ckpt_path={ckpt}", "export.formats=[qat,gguf]"], name="export"
    )
    summary = run(cfg2)
    assert Path(summary["gguf"]).is_file()
    assert (Path(summary["qat"]) / "manifest.json").is_file()
    assert summary["parity"]["output"]["top1"] == 1.0
    # train.py returns this to Hydra: nothing measured by an export (it used to crash on the
    # summary's file paths after a successful export).
    assert monitored_value(summary, "ppl") is None
    assert monitored_value(res, "ppl") == res["qat"]["test/ppl"]
    with pytest.raises(ValueError, match=r"export\.formats: got 'tflite'"):
        run(
            make_cfg(
                gpt + ["task=export", f"ckpt_path={ckpt}", "export.formats=[tflite]"], name="bad"
            )
        )
