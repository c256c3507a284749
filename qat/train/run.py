"""The commands `train.py` runs (`task=train|ptq|sensitivity|eval|export`), on a checked `Job`.

    job = preflight(cfg)      # seconds: config, recipe, plan, checkpoint; no data, no Lightning
    results = run(job)        # data, training, evaluation, export

Under DDP every rank trains; rank 0 alone evaluates, exports and reports.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

import qat
from qat.export.integer.packing import weight_bytes
from qat.io import write_json
from qat.ptq import GPTQConfig, apply_gptq
from qat.quant.calibrate import calibrate
from qat.sensitivity import Width, candidates, mixed_recipe, scan, write_recipe
from qat.sensitivity.choice import Choice
from qat.sensitivity.mixed_recipe import at_width
from qat.sensitivity.report import write_plot, write_tables
from qat.sensitivity.width import is_grouped
from qat.train.artifacts import export_trained, float_model_of, model_from_checkpoint
from qat.train.callbacks import QATScheduleCallback
from qat.train.checkpoint import Checkpoint, check_meta, model_state
from qat.train.console import (
    calibration_batches,
    print_summary,
    quiet_libraries,
    say,
    stage_line,
    step_bar,
)
from qat.train.model_spec import ModelSpec
from qat.train.module import QATModule
from qat.train.objectives import model_forward, objective_loss, token_mask
from qat.train.preflight import Job, calibration_count, needs_teacher, preflight, weight_method
from qat.train.sharding import unsharded
from qat.train.trainer import evaluate, fit, is_rank_zero


def build_data(cfg: DictConfig) -> L.LightningDataModule:
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    return dm


def make_module(job: Job, model: torch.nn.Module, dm: Any, meta: dict, **over: Any) -> QATModule:
    m = dict(OmegaConf.to_container(job.cfg.module, resolve=True))
    m.update(over)
    teacher = m.pop("teacher", None)
    return QATModule(
        model, num_classes=getattr(dm, "num_classes", None), teacher=teacher, meta=meta, **m
    )


def _evaluate(job: Job, stage: str, module: QATModule, dm: Any, sub: str = "") -> dict:
    start = time.perf_counter()
    metrics = evaluate(job.cfg, module, dm, job.out_dir / sub if sub else job.out_dir)
    say(stage_line(stage, metrics, job.objective, time.perf_counter() - start))
    return metrics


def train_float(
    job: Job, dm: Any, spec: ModelSpec
) -> tuple[torch.nn.Module, str | None, dict | None]:
    """Float stage: train from scratch, or load `init_from`. Returns the model, the float
    checkpoint (the distillation teacher's weights, for resumes) and its metrics (rank 0)."""
    cfg = job.cfg
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model = spec.build()
    meta = {"objective": job.objective, "model": spec.as_dict(), "recipe": None,
            "stage": "float"}  # fmt: skip
    steps, float_ckpt = int(cfg.float_stage.max_steps), None
    if job.init_from is not None:  # the data's sizes are known now: check them too
        check_meta(job.init_from.meta, {"objective": job.objective, "model": spec.as_dict()})
        model.load_state_dict(model_state(job.init_from.data))
        steps, float_ckpt = 0, str(job.init_from.path)
    # The embedding objective measures against the float model: here, a frozen copy of itself.
    teacher = copy.deepcopy(model) if job.objective == "embedding" else None
    module = make_module(job, model, dm, meta, lr=float(cfg.float_stage.lr), teacher=teacher)
    if steps > 0:
        fit(cfg, module, dm, job.out_dir / "float", "float", steps)
        float_ckpt = str((job.out_dir / "float" / "checkpoints" / "last.ckpt").resolve())
        trained = unsharded(model, spec.build)
        if trained is not model:
            model = trained
            module = make_module(job, model, dm, meta, lr=float(cfg.float_stage.lr),
                                 teacher=teacher)  # fmt: skip
    metrics = _evaluate(job, "float", module, dm, "float") if is_rank_zero() else None
    return model, float_ckpt, metrics


def _resumed_float(job: Job, spec: ModelSpec) -> tuple[torch.nn.Module, str | None]:
    """The float model of a resumed run: the trained teacher when distilling."""
    model = spec.build()
    float_ckpt = job.resume.meta.get("float_checkpoint")
    if needs_teacher(job.cfg) and float_ckpt:
        model.load_state_dict(model_state(Checkpoint.open(float_ckpt).data))
    return model, float_ckpt


def quantize_start(job: Job, model: torch.nn.Module, dm: Any) -> None:
    """Calibrate, then (`task=ptq ptq=gptq`, or a recipe with `init: gptq`) GPTQ the
    weights on the same batches: the codes QAT starts from, or PTQ exports."""
    cfg = job.cfg
    method = weight_method(job)
    n_cal = 1 if cfg.trainer.get("fast_dev_run") else calibration_count(job)
    if not n_cal:
        return
    show = is_rank_zero() and bool(cfg.trainer.get("enable_progress_bar", True))
    batches: Any = dm.train_dataloader()
    if method == "gptq":  # GPTQ runs the batches again, stage by stage
        batches = list(islice(batches, n_cal))
    forward = lambda m, b: model_forward(job.objective, m, b)  # noqa: E731
    mask = partial(token_mask, job.objective)
    calibrate(model, calibration_batches(batches, n_cal, show), n_cal, forward, mask)
    if method == "gptq":
        start = time.perf_counter()
        gptq = GPTQConfig(float(cfg.ptq.percdamp), int(cfg.ptq.block_size),
                          bool(cfg.ptq.act_order), bool(cfg.ptq.sequential))  # fmt: skip
        with step_bar("GPTQ", show) as advance:
            report = apply_gptq(model, batches, gptq, forward, advance, token_mask=mask)
        if is_rank_zero():
            say(f"{report.summary()}, in {time.perf_counter() - start:.1f} s")


def train(job: Job) -> dict[str, Any]:
    """Float stage, calibration (and GPTQ), QAT (none for `task=ptq`), then (rank 0)
    evaluation, export and the summary."""
    cfg, out_dir = job.cfg, job.out_dir
    if is_rank_zero():
        say(job.plan.summary())
    dm = build_data(cfg)
    spec = job.model.resolved(dm)
    results: dict[str, Any] = {"run_dir": str(out_dir), "recipe": cfg.get("recipe_name")}
    if job.resume is None:
        float_model, float_ckpt, results["float"] = train_float(job, dm, spec)
    else:
        if is_rank_zero():
            say(f"resuming {job.resume.path} at step {job.resume.global_step}")
        results["float"] = job.resume.meta.get("float_metrics")
        float_model, float_ckpt = _resumed_float(job, spec)
    L.seed_everything(int(cfg.seed) + 1, workers=True, verbose=False)
    # LoRA-QAT never trains the base weights: the model seen as float is the teacher (the
    # embedding objective also scores the integer model against it, so it keeps a copy).
    from_base = job.recipe.lora is not None and job.objective != "embedding"
    teacher = copy.deepcopy(float_model) if needs_teacher(job.cfg) and not from_base else None
    model = qat.prepare(float_model, job.recipe)
    stage = "ptq" if job.command == "ptq" else "qat"
    steps = 0 if stage == "ptq" else int(cfg.trainer.max_steps)
    meta = {
        "objective": job.objective,
        "model": spec.as_dict(),
        "recipe": job.recipe.to_dict(),
        "stage": "qat",
        "float_metrics": results["float"],
        "float_checkpoint": float_ckpt,
    }
    module = make_module(job, model, dm, meta, teacher=teacher, max_steps=steps,
                         distill_from_base=from_base)
    sched = job.recipe.schedule.steps(steps)
    if job.resume is None:
        quantize_start(job, model, dm)
    callbacks = [QATScheduleCallback(sched, int(cfg.get("log_quant_every_n_steps", 50)),
                                     weight_observers=job.recipe.init != "gptq")]  # fmt: skip
    fit(cfg, module, dm, out_dir, "qat", steps, job.resume, callbacks)
    trained = unsharded(model, lambda: qat.prepare(spec.build(), job.recipe))
    if trained is not model:
        model = trained
        module = make_module(job, model, dm, meta, teacher=teacher, max_steps=steps,
                             distill_from_base=from_base)
    if not is_rank_zero():
        say("training done on this rank; rank 0 evaluates, exports and reports")
        return results
    results[stage] = _evaluate(job, stage, module, dm)
    last = out_dir / "checkpoints" / "last.ckpt"
    results["qat_checkpoint"] = str(last) if last.exists() else None  # none: no steps ran
    outputs = {"checkpoint": str(last)} if last.exists() else {}
    if cfg.export.get("enabled", True) and not job.recipe.is_float():
        int_model, results["artifacts"] = export_trained(job, model, dm)
        outputs.update({f: results["artifacts"][f] for f in job.formats})
        int_module = make_module(job, int_model, dm, meta, teacher=teacher)
        results["export"] = _evaluate(job, "export", int_module, dm, "export")
    outputs["metrics"] = str(write_json(out_dir / "metrics.json", results))
    print_summary(results, job.objective, outputs)
    return results


def _validation_loss(job: Job, batches: list, teacher: torch.nn.Module, measure: str):
    """Mean objective loss over `batches`, or with `measure="kl"` the KL divergence from the
    float model's output distribution (the embedding objective always scores against the
    float model's outputs)."""
    m = job.cfg.module
    targets, kd = None, 1.0 if measure == "kl" else 0.0
    if job.objective == "embedding" or kd:
        with torch.no_grad():
            targets = [model_forward(job.objective, teacher.eval(), b) for b in batches]

    @torch.no_grad()
    def loss(model: torch.nn.Module) -> float:
        total = 0.0
        for i, b in enumerate(batches):
            out = model_forward(job.objective, model, b)
            total += float(objective_loss(job.objective, out, b, targets and targets[i], kd,
                                          1.0, str(m.distill_loss)))  # fmt: skip
        return total / len(batches)

    return loss


def _budget(sens: DictConfig, groups: list, job: Job, model: torch.nn.Module) -> float:
    """The budget in artifact bytes of the scanned weights, from whichever key is set."""
    if sens.get("budget_recipe") or sens.get("budget_uniform_bits") is not None:
        # each scanned weight as the recipe gives it, or at that width with the rest kept
        mods, bits = dict(model.named_modules()), sens.get("budget_uniform_bits")
        return float(sum(weight_bytes(spec if bits is None else
                                      dataclasses.replace(spec, bits=int(bits)),
                                      tuple(mods[name].weight.shape))
                         for name, spec in job.plan.weight_specs().items()))  # fmt: skip
    if sens.get("budget_mib") is not None:
        return float(sens.budget_mib) * 2**20
    return float(sens.budget_bits_per_weight) * sum(g.weights for g in groups) / 8


def _recipe_widths(groups: list, job: Job, sizes: list[int]) -> dict[str, Width] | None:
    """Group -> the width the recipe itself gives it, to set beside the mixed choice; None
    when a group's layers differ in width or one is not a candidate."""
    own = {name: Width.of(spec, sizes) for name, spec in job.plan.weight_specs().items()}
    out = {}
    for g in groups:
        widths = {own[n] for n in g.layers}
        if len(widths) != 1 or (w := widths.pop()) not in g.delta:
            return None
        out[g.name] = w
    return out


def sensitivity_command(job: Job) -> dict[str, Any]:
    """`task=sensitivity`: each weight group's loss change at each candidate width, and the
    mixed-precision recipe under the budget with the least predicted loss."""
    cfg, sens = job.cfg, job.cfg.sensitivity
    say(job.plan.summary())
    dm = build_data(cfg)
    float_model, float_ckpt, results = train_float(job, dm, job.model.resolved(dm))
    val = list(islice(dm.val_dataloader(), int(sens.batches)))
    cal = list(islice(dm.train_dataloader(), int(sens.calibration_batches)))
    forward = lambda m, b: model_forward(job.objective, m, b)  # noqa: E731
    base = OmegaConf.to_container(cfg.recipe, resolve=True)  # as the user wrote it
    specs, sizes = job.plan.weight_specs(), list(sens.get("group_sizes") or [])
    grouped = {name for name, spec in specs.items() if is_grouped(spec)}
    models = {}
    for width in candidates(list(sens.bits), sizes):  # each fits: preflight planned them all
        model = qat.prepare(copy.deepcopy(float_model), at_width(base, width, grouped))
        calibrate(model, cal, len(cal), forward, partial(token_mask, job.objective))
        models[width] = model
    layers = list(specs)
    show = bool(cfg.trainer.get("enable_progress_bar", True))
    start = time.perf_counter()
    with step_bar("sensitivity", show) as advance:
        measure = str(sens.measure)
        loss0, groups = scan(models, layers, _validation_loss(job, val, float_model, measure),
                             str(sens.group_by), measure, advance,
                             activations=sens.get("activations", "float") == "recipe")
    budget = _budget(sens, groups, job, float_model)
    try:
        choice = Choice.under(groups, budget)
    except ValueError as e:
        raise ValueError(f"sensitivity: {e}") from None
    path = Path(sens.out).resolve() if sens.out else job.out_dir / "mixed_recipe.yaml"
    recipe = mixed_recipe(base, choice.layer_widths(), grouped, choice.description())
    header = _scan_header(job, sorted(models), len(val), loss0, choice, budget)
    files = {"recipe": str(write_recipe(path, recipe, header))}
    if float_ckpt:
        files["checkpoint"] = str(float_ckpt)  # the float model: init_from= for the next run
    md, csv_path = write_tables(groups, choice.widths, job.out_dir)
    files.update(table=str(md), csv=str(csv_path))
    plot = write_plot(groups, choice.widths, job.out_dir / "sensitivity.png",
                      f"{sens.measure} change")  # fmt: skip
    if plot is not None:
        files["plot"] = str(plot)
    uniform, widths = choice.uniform(), _recipe_widths(groups, job, sizes)
    own = None
    if widths:
        n, d = choice.at(widths)
        own = {"size_bytes": n, "predicted_change": d}
    say(f"sensitivity: {len(groups)} groups x {len(models)} widths in "
        f"{time.perf_counter() - start:.1f} s; {_scan_line(choice, own, uniform)}")
    summary = {"float": results, "float_checkpoint": float_ckpt, "base_loss": loss0,
               "budget_bytes": budget, "size_bytes": choice.size,
               "predicted_change": choice.predicted, "weights": choice.weights,
               "chosen": {g: str(w) for g, w in choice.widths.items()}, "files": files,
               "recipe_widths": own,
               "uniform": {str(w): {"size_bytes": n, "predicted_change": d}
                           for w, (n, d) in uniform.items()},
               "settings": OmegaConf.to_container(sens, resolve=True)}  # fmt: skip
    files["summary"] = str(write_json(job.out_dir / "sensitivity.json", summary))
    print_summary({}, job.objective, files)
    return summary


def _scan_header(job: Job, widths: list, batches: int, loss0: float, choice: Choice,
                 budget: float) -> list[str]:  # fmt: skip
    """The written recipe's header comment: how it was made."""
    cfg, sens = job.cfg, job.cfg.sensitivity
    grouped = any(w.group_size for w in widths)
    return [
        "Written by `python train.py task=sensitivity` "
        f"(recipe={cfg.get('recipe_name')}, model={job.model.builder}, seed={cfg.seed}).",
        f"Each {sens.group_by}'s weights quantized alone at {'/'.join(map(str, widths))}"
        f" bits{' (NgM: groups of M)' if grouped else ''}, the other weights float "
        f"({sens.measure} on {batches} validation batches, from {loss0:.4g} with float weights "
        f"and {sens.get('activations', 'float')} activations),",
        f"then a knapsack for the budget {budget / 2**20:.4f} MiB "
        f"({choice.bits_per_weight(budget):.3f} bits per scanned weight, scales included):",
        f"chosen {choice.size / 2**20:.4f} MiB ({choice.bits_per_weight():.3f} bits per "
        f"weight), predicted {sens.measure} change {choice.predicted:+.4g} (summed over groups).",
    ]


def _scan_line(choice: Choice, own: dict | None, uniform: dict) -> str:
    """Bits per weight and predicted change: the mixed choice, the recipe's own widths, each
    width uniform."""
    parts = [f"mixed {choice.bits_per_weight():.3f} bits/weight {choice.predicted:+.4g}"]
    parts.append(f"recipe {choice.bits_per_weight(own['size_bytes']):.3f} "
                 f"{own['predicted_change']:+.4g}" if own else
                 "recipe: its widths are not all candidates")  # fmt: skip
    parts.append("uniform " + ", ".join(f"{w}: {choice.bits_per_weight(n):.3f} {d:+.4g}"
                                        for w, (n, d) in uniform.items()))  # fmt: skip
    return "; ".join(parts)


def evaluate_command(job: Job) -> dict[str, Any]:
    """A checkpoint's fake-quant model (with `eval.without_fake_quant` also its weights with
    fake quant off), or an exported artifact (`artifact=DIR`, the integer model)."""
    cfg = job.cfg
    dm = build_data(cfg)
    embedding = job.objective == "embedding"
    if job.artifact is not None:
        model = qat.load(job.artifact)
        teacher = float_model_of(job.artifact) if embedding else None
        module = make_module(job, model, dm, {}, teacher=teacher)
        results: dict[str, Any] = {
            "artifact": str(job.artifact),
            "integer": _evaluate(job, "integer", module, dm),
        }
    else:
        path, meta = job.checkpoint.path, job.checkpoint.meta
        model = model_from_checkpoint(job.checkpoint.data)
        model.apply(qat.quant.disable_observer)
        teacher = None
        if embedding:  # the float model the student was distilled from
            teacher = ModelSpec(meta["model"]["builder"], meta["model"]["args"]).build()
        module = make_module(job, model, dm, meta, teacher=teacher)
        key = "float" if job.checkpoint.is_float else "fake_quant"
        results = {"checkpoint": str(path), key: _evaluate(job, key, module, dm)}
        if cfg.get("eval", {}).get("without_fake_quant", False):
            model.apply(qat.quant.disable_fake_quant)
            results["without_fake_quant"] = _evaluate(job, "without_fake_quant", module, dm)
    out = write_json(job.out_dir / "eval.json", results)
    print_summary(results, job.objective, {"metrics": str(out)})
    return results


def export_command(job: Job) -> dict[str, Any]:
    """`task=export ckpt_path=...`: export a training checkpoint into this run's dir."""
    model = model_from_checkpoint(job.checkpoint.data)
    dm = build_data(job.cfg)
    _, summary = export_trained(job, model, dm)
    summary["checkpoint"] = str(job.checkpoint.path)
    out = write_json(job.out_dir / "export" / "summary.json", summary)
    outputs = {f: summary[f] for f in job.formats}
    print_summary({}, job.objective, {**outputs, "summary": str(out)})
    return summary


def monitored_value(results: dict[str, Any], metric: str) -> float | None:
    """The test `metric` a run reports (QAT, else an evaluated checkpoint), for Hydra
    sweepers; None where the task measured none (e.g. `task=export`, whose summary maps
    formats to file paths)."""
    for key in ("qat", "ptq", "fake_quant", "float"):
        part = results.get(key)
        if isinstance(part, dict) and f"test/{metric}" in part:
            return float(part[f"test/{metric}"])
    return None


RUNNERS = {"train": train, "ptq": train, "sensitivity": sensitivity_command,
           "eval": evaluate_command, "export": export_command}  # fmt: skip


def run(cfg: DictConfig | Job) -> dict[str, Any]:
    """Run the command of `cfg` (checked by `preflight` first) or of a checked `Job`."""
    job = cfg if isinstance(cfg, Job) else preflight(cfg)
    quiet_libraries()
    torch.set_num_threads(job.threads)
    return RUNNERS[job.command](job)

