"""LoRA-QAT through `train.py`'s run: frozen base, adapter-only optimizer state, exact resume,
and an export that passes the parity gate with the adapters merged."""

from pathlib import Path

import torch

from qat.train.checkpoint import load_checkpoint, model_state
from qat.train.run import run

GPT_TINY = [
    "experiment=shakespeare_w4g32a8",
    "recipe=w4g32_lora",
    "model.args.preset=tiny",
    "data.block_size=32",
    "data.batch_size=8",
    "float_stage.max_steps=10",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "threads=1",
    "recipe.schedule.calibrate=2",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.model_checkpoint.filename='step{step}'",
]


def test_lora_qat_trains_adapters_only_resumes_exactly_and_exports(make_cfg):
    common = GPT_TINY + ["trainer.max_steps=8", "trainer.val_check_interval=4"]
    cfg = make_cfg(common, name="straight")
    res = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert res["export"]["val/ppl"] == res["qat"]["val/ppl"]  # the parity-gated artifact
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    state = model_state(ckpt)
    float_ckpt = load_checkpoint(out / "float" / "checkpoints" / "last.ckpt")
    # 10 float steps, checkpoints every 4: last.ckpt still holds step 10, the model trained on.
    assert (float_ckpt["global_step"], ckpt["global_step"]) == (10, 8)
    float_state = model_state(float_ckpt)
    # The base weights are the float stage's, untouched by 8 QAT steps.
    for k, v in float_state.items():
        assert torch.equal(state[k], v), k
    lora = [k for k in state if ".lora." in k]
    assert lora and any(state[k].abs().sum() > 0 for k in lora if k.endswith(".B"))
    # AdamW holds state for the adapters and the learned scales only.
    scales = [k for k in state if k.endswith("weight_quant.scale")]
    assert len(ckpt["optimizer_states"][0]["state"]) == len(lora) + len(scales)

    cfg2 = make_cfg(common + [f"ckpt_path={out / 'checkpoints' / 'step4.ckpt'}"], name="resumed")
    run(cfg2)
    resumed = model_state(load_checkpoint(Path(cfg2.paths.output_dir) / "checkpoints/last.ckpt"))
    assert resumed.keys() == state.keys()
    for k in state:
        assert torch.equal(state[k], resumed[k]), k


def test_q4_0_lora_keeps_its_calibrated_scales_and_trains_adapters_alone(make_cfg):
    """The shipped q4_0_lora fixes its group scales at calibration (learn: none, observers
    frozen from the first step): AdamW holds state for the adapters alone, and the scales a
    checkpoint holds at step 4 are those at step 8."""
    common = GPT_TINY + ["recipe=q4_0_lora", "trainer.max_steps=8", "trainer.val_check_interval=4"]
    cfg = make_cfg(common, name="fixed_scales")
    res = run(cfg)
    assert res["export"]["val/ppl"] == res["qat"]["val/ppl"]  # the parity-gated artifact
    out = Path(cfg.paths.output_dir) / "checkpoints"
    last, mid = load_checkpoint(out / "last.ckpt"), load_checkpoint(out / "step4.ckpt")
    state, early = model_state(last), model_state(mid)
    lora = [k for k in state if ".lora." in k]
    assert len(last["optimizer_states"][0]["state"]) == len(lora)
    scales = [k for k in state if k.endswith("weight_quant.scale")]
    assert scales and all(torch.equal(state[k], early[k]) for k in scales)
    assert any(not torch.equal(state[k], early[k]) for k in lora)
