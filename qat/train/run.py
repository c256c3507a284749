"""What `train.py` runs for each `task`: train (float stage, then QAT), eval, export."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

import qat
from qat.models.registry import build_model
from qat.quant.calibrate import calibrate
from qat.train.callbacks import QATScheduleCallback
from qat.train.checkpoint import (
    find_last_checkpoint,
    load_checkpoint,
    model_state,
)
from qat.train.data import set_stream_position, stream_loader
from qat.train.module import QATModule, check_meta
from qat.train.report import print_summary, write_json_atomic
from qat.train.tasks import model_forward


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def build_data(cfg: DictConfig) -> L.LightningDataModule:
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    return dm


def model_spec(cfg: DictConfig, dm: Any) -> dict[str, Any]:
    """Builder name and JSON arguments; `auto` values are filled from the datamodule."""
    args = dict(_plain(cfg.model.get("args", {})) or {})
    for key in ("vocab_size", "num_classes"):
        if args.get(key) == "auto":
            if not hasattr(dm, key):
                raise ValueError(f"model.args.{key}=auto but data {type(dm).__name__} has no {key}")
            args[key] = int(getattr(dm, key))
    return {"builder": str(cfg.model.builder), "args": args}


def make_module(cfg: DictConfig, model: torch.nn.Module, dm: Any, meta: dict, **over: Any):
    m = dict(_plain(cfg.module))
    m.update(over)
    teacher = m.pop("teacher", None)
    return QATModule(
        model, num_classes=getattr(dm, "num_classes", None), teacher=teacher, meta=meta, **m
    )


def make_trainer(
    cfg: DictConfig, out_dir: Path, stage: str, max_steps: int, single: bool = False
) -> L.Trainer:
    """The configured Trainer; `single=True` for evaluation (one process, even under DDP)."""
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if single:  # evaluation never writes checkpoints
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    for cb in callbacks:
        if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint):
            cb.dirpath = str(out_dir / "checkpoints")
    loggers = [hydra.utils.instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    for lg in loggers:
        if hasattr(lg, "_name"):  # one log folder per stage: logs/float, logs/qat, ...
            lg._name = f"{lg._name}/{stage}"
    over: dict[str, Any] = {}
    if single:
        over = {"strategy": "auto", "devices": 1, "num_nodes": 1}
    elif "spawn" in str(cfg.trainer.get("strategy", "")):
        # Spawned workers receive the model through shared memory; file descriptors fail
        # here for some storages ("unable to resize file"), named files work.
        torch.multiprocessing.set_sharing_strategy("file_system")
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        max_steps=max_steps,
        default_root_dir=str(out_dir),
        **over,
    )


def _eval_loaders(dm: Any) -> dict[str, Any]:
    return {"val": dm.val_dataloader(), "test": dm.test_dataloader()}


def evaluate(cfg: DictConfig, module: QATModule, dm: Any, out_dir: Path) -> dict[str, float]:
    """Metrics on val and test as `{"val/acc": ..., "test/acc": ...}`, in one process."""
    trainer = make_trainer(cfg, out_dir, "eval", 0, single=True)
    out: dict[str, float] = {}
    for split, loader in _eval_loaders(dm).items():
        fn = trainer.validate if split == "val" else trainer.test
        res = fn(module, dataloaders=loader, verbose=False)
        out.update({k: float(v) for k, v in res[0].items() if k.startswith(f"{split}/")})
    return out


def fit(
    cfg, module, dm, out_dir, stage, max_steps, ckpt_path=None, extra_callbacks=(), start_step=None
):
    """Train `module` for `max_steps` optimizer steps (0: nothing to do, e.g. PTQ).

    Resuming (`ckpt_path`), the data stream continues from the checkpoint's global step:
    `start_step` when the caller has read the checkpoint already, else read here.
    """
    trainer = make_trainer(cfg, out_dir, stage, max_steps)
    if max_steps == 0 and ckpt_path is None:
        return trainer
    trainer.callbacks.extend(extra_callbacks)
    loader = stream_loader(dm, int(cfg.seed))
    if ckpt_path is not None:  # resume the data stream where the checkpoint left it
        if start_step is None:
            start_step = int(load_checkpoint(ckpt_path).get("global_step", 0))
        accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
        set_stream_position(loader, start_step, accumulate)
    val = dm.val_dataloader() if cfg.trainer.get("limit_val_batches", 1) != 0 else None
    trainer.fit(
        module,
        train_dataloaders=loader,
        val_dataloaders=val,
        ckpt_path=ckpt_path,
        weights_only=True,
    )
    return trainer


def resolve_ckpt(cfg: DictConfig) -> str | None:
    path = cfg.get("ckpt_path")
    if path in (None, ""):
        return None
    if path == "last":
        return str(find_last_checkpoint(Path(cfg.paths.log_dir) / str(cfg.run_name)))
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist")
    return str(path)


def train_float(cfg, dm, spec, out_dir) -> tuple[torch.nn.Module, dict[str, float]]:
    """Float stage: train from scratch, or load `init_from`; returns the model and metrics."""
    L.seed_everything(int(cfg.seed), workers=True)
    model = build_model(spec["builder"], **spec["args"])
    meta = {"task": cfg.module.task, "model": spec, "recipe": None, "stage": "float"}
    init_from = cfg.get("init_from")
    steps = int(cfg.float_stage.max_steps)
    if init_from:
        ckpt = load_checkpoint(init_from)
        saved = ckpt.get("qat_meta") or {}
        if saved.get("recipe") is not None:
            raise ValueError(
                f"init_from={init_from} is a QAT checkpoint; init_from takes the float stage's "
                "checkpoint (float/checkpoints/last.ckpt). To continue a QAT run use ckpt_path."
            )
        check_meta(saved, {k: meta[k] for k in ("task", "model")})
        model.load_state_dict(model_state(ckpt))
        steps = 0
    # The embedding task measures against the float model: here, a frozen copy of itself.
    teacher = copy.deepcopy(model) if cfg.module.task == "embedding" else None
    module = make_module(cfg, model, dm, meta, lr=float(cfg.float_stage.lr), teacher=teacher)
    if steps > 0:
        fit(cfg, module, dm, out_dir / "float", "float", steps)
        init_from = str(out_dir / "float" / "checkpoints" / "last.ckpt")
    model.qat_float_checkpoint = init_from or None  # the teacher's weights, for resumes
    return model, evaluate(cfg, module, dm, out_dir / "float")


def run_train(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    dm = build_data(cfg)
    spec = model_spec(cfg, dm)
    recipe = qat.Recipe.from_dict(cfg.recipe)
    ckpt_path = resolve_ckpt(cfg)
    steps = int(cfg.trainer.max_steps)
    results: dict[str, Any] = {"run_dir": str(out_dir), "recipe": cfg.get("recipe_name")}
    start_step = 0
    if ckpt_path is None:
        float_model, results["float"] = train_float(cfg, dm, spec, out_dir)
    else:  # resuming: the float stage is done; the student comes from the checkpoint
        ckpt = load_checkpoint(ckpt_path)  # read once here (MiniLM's is ~270 MB)
        saved, start_step = ckpt.get("qat_meta") or {}, int(ckpt.get("global_step", 0))
        del ckpt
        results["float"] = saved.get("float_metrics")
        float_model = build_model(spec["builder"], **spec["args"])
        float_ckpt = saved.get("float_checkpoint")
        if _needs_teacher(cfg) and float_ckpt:  # the teacher must be the trained float model
            float_model.load_state_dict(model_state(load_checkpoint(float_ckpt)))
        float_model.qat_float_checkpoint = float_ckpt
    L.seed_everything(int(cfg.seed) + 1, workers=True)
    teacher = copy.deepcopy(float_model) if _needs_teacher(cfg) else None
    model = qat.prepare(float_model, recipe)
    meta = {
        "task": cfg.module.task,
        "model": spec,
        "recipe": recipe.to_dict(),
        "stage": "qat",
        "float_metrics": results["float"],
        "float_checkpoint": getattr(float_model, "qat_float_checkpoint", None),
    }
    module = make_module(cfg, model, dm, meta, teacher=teacher, max_steps=steps)
    sched = recipe.schedule.steps(steps)
    n_cal = 1 if cfg.trainer.get("fast_dev_run") else sched["calibrate"]
    if ckpt_path is None and n_cal:
        calibrate(
            model,
            dm.train_dataloader(),
            n_cal,
            forward=lambda m, b: model_forward(module.task, m, b),
        )
    every = int(cfg.get("log_quant_every_n_steps", 50))
    callbacks = [QATScheduleCallback(sched, every)]
    fit(cfg, module, dm, out_dir, "qat", steps, ckpt_path, callbacks, start_step=start_step)
    results["qat"] = evaluate(cfg, module, dm, out_dir)
    results["qat_checkpoint"] = str(out_dir / "checkpoints" / "last.ckpt")
    if cfg.export.get("enabled", True) and not recipe.is_float() and _is_rank_zero():
        from qat.train.export_task import export_trained

        int_model, results["artifacts"] = export_trained(cfg, model, dm, out_dir)
        int_module = make_module(cfg, int_model, dm, meta, teacher=teacher)
        results["export"] = evaluate(cfg, int_module, dm, out_dir / "export")
    if _is_rank_zero():
        write_json_atomic(out_dir / "metrics.json", results)
        print_summary(results, cfg.module.task)
    return results


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _needs_teacher(cfg: DictConfig) -> bool:
    return cfg.module.task == "embedding" or float(cfg.module.get("kd_weight", 0)) > 0


def _check_eval_target(cfg: DictConfig, what: str, task: str | None, builder: str | None) -> None:
    """Evaluation builds the data from this config: refuse a model made for another task or
    model (it would fail deep inside a layer with a shape error, or measure nonsense)."""
    ours = (str(cfg.module.task), str(cfg.model.builder))
    if (task is not None and task != ours[0]) or (builder is not None and builder != ours[1]):
        made = f"task {task!r} with model builder {builder!r}" if task else f"model {builder!r}"
        raise ValueError(
            f"{what} was made for {made}, but this "
            f"config has module.task={ours[0]!r} and model.builder={ours[1]!r}: evaluate it with "
            "the experiment it was trained with (e.g. experiment=minilm_w8a8_kd; the training "
            "run's overrides are in <run dir>/.hydra/overrides.yaml)"
        )


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a checkpoint's fake-quant model (model and recipe from its metadata; with
    `eval.without_fake_quant` also the same weights with fake quant off), or an exported
    artifact (`artifact=DIR`, the integer model)."""
    out_dir = Path(cfg.paths.output_dir)
    dm = build_data(cfg)
    embedding = cfg.module.task == "embedding"
    if cfg.get("artifact"):
        from qat.train.export_task import teacher_for_artifact

        model = qat.load(cfg.artifact)
        builder = getattr(model, "builder_name", None)
        _check_eval_target(cfg, f"artifact={cfg.artifact}", None, builder)
        teacher = teacher_for_artifact(cfg.artifact) if embedding else None
        module = make_module(cfg, model, dm, {}, teacher=teacher)
        results: dict[str, Any] = {
            "artifact": str(cfg.artifact),
            "integer": evaluate(cfg, module, dm, out_dir),
        }
    else:
        ckpt_path = resolve_ckpt(cfg)
        if ckpt_path is None:
            raise ValueError("task=eval needs ckpt_path=<checkpoint> (or last) or artifact=<dir>")
        from qat.train.export_task import model_from_checkpoint

        ckpt = load_checkpoint(ckpt_path)
        meta = ckpt.get("qat_meta") or {}
        builder = (meta.get("model") or {}).get("builder")
        _check_eval_target(cfg, f"ckpt_path={ckpt_path}", meta.get("task"), builder)
        model = model_from_checkpoint(ckpt)
        model.apply(qat.quant.disable_observer)
        teacher = None
        if embedding:  # the float model the student was distilled from
            teacher = build_model(meta["model"]["builder"], **meta["model"]["args"])
        module = make_module(cfg, model, dm, meta, teacher=teacher)
        key = "fake_quant" if meta.get("recipe") is not None else "float"  # a float-stage ckpt
        results = {"checkpoint": ckpt_path, key: evaluate(cfg, module, dm, out_dir)}
        if cfg.get("eval", {}).get("without_fake_quant", False):
            model.apply(qat.quant.disable_fake_quant)
            results["without_fake_quant"] = evaluate(cfg, module, dm, out_dir)
    if _is_rank_zero():
        write_json_atomic(out_dir / "eval.json", results)
        print(json.dumps(results, indent=2))
    return results


def monitored_value(results: dict[str, Any], metric: str) -> float | None:
    """The test `metric` a run reports (QAT, else an evaluated checkpoint), for Hydra
    sweepers; None where the task measured none (e.g. `task=export`, whose summary maps
    formats to file paths)."""
    for key in ("qat", "fake_quant", "float"):
        part = results.get(key)
        if isinstance(part, dict) and f"test/{metric}" in part:
            return float(part[f"test/{metric}"])
    return None


def run(cfg: DictConfig) -> dict[str, Any]:
    torch.set_num_threads(int(cfg.get("threads") or os.cpu_count() or 1))
    task = cfg.get("task", "train")
    if task == "train":
        return run_train(cfg)
    if task == "eval":
        return run_eval(cfg)
    if task == "export":
        from qat.train.export_task import run_export

        return run_export(cfg)
    raise ValueError(f"task: got {task!r}; allowed: train, eval, export")
