"""Everything a run can check before it loads data or imports Lightning: a few seconds.

`preflight(cfg)` reads the command, range-checks the numbers, reads and plans the recipe
against the model, and opens the checkpoint or artifact it names. Each problem is one
`ValueError` naming the config key, the value and the fix. The result, a `Job`, holds the
objects built on the way, so the run does not build them again.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import qat
from qat.export import read_manifest
from qat.export.onnx.ops import writes_dynamic
from qat.quant.plan import Plan
from qat.quant.recipe import Recipe
from qat.sensitivity.mixed_recipe import at_width
from qat.sensitivity.width import candidates, is_grouped
from qat.train.checkpoint import Checkpoint, check_meta, find_last_checkpoint, objective_of
from qat.train.model_spec import ModelSpec

COMMANDS = ("train", "ptq", "sensitivity", "eval", "export")
OBJECTIVES = ("classification", "causal_lm", "embedding")
FORMATS = ("qat", "onnx", "gguf")
GGUF_BUILDERS = ("gpt", "hf_gguf")


def _int(lo: int) -> tuple[Any, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo,
            f"an integer >= {lo}")


def _num(lo: float, hi: float | None = None, open_lo: bool = False) -> tuple[Any, str]:
    def ok(v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        return (v > lo if open_lo else v >= lo) and (hi is None or v <= hi)

    span = f"{'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi else ')'}"
    return ok, f"a number in {span}"


def _either(a: tuple[Any, str], b: tuple[Any, str]) -> tuple[Any, str]:
    return (lambda v: a[0](v) or b[0](v)), f"{a[1]}, or {b[1]}"


def _choice(*values: Any) -> tuple[Any, str]:
    return (lambda v: v in values), ", ".join(map(str, values))


_STEPS = _int(0)
_BATCHES = _either(_int(0), _num(0.0, 1.0))
# key -> (accepts?, allowed). A key absent from the config is not checked.
NUMBERS: dict[str, tuple[Any, str]] = {
    "trainer.max_steps": (_STEPS[0], "an integer >= 0 (0: calibrate and export, no training)"),
    "float_stage.max_steps": (_STEPS[0], "an integer >= 0 (0: no float training)"),
    "trainer.val_check_interval": _either(_int(1), _num(0.0, 1.0, open_lo=True)),
    "trainer.limit_val_batches": _BATCHES,
    "trainer.limit_test_batches": _BATCHES,
    "trainer.log_every_n_steps": _int(1),
    "trainer.accumulate_grad_batches": _int(1),
    "data.batch_size": _int(1),
    "float_stage.lr": _num(0.0, open_lo=True),
    "module.lr": _num(0.0, open_lo=True),
    "module.weight_decay": _num(0.0),
    "module.quant_lr_mult": _num(0.0, open_lo=True),
    "module.warmup_steps": _int(0),
    "module.kd_weight": _num(0.0, 1.0),
    "module.kd_temperature": _num(0.0, open_lo=True),
    "module.objective": _choice(*OBJECTIVES),
    "module.optimizer": _choice("adamw", "sgd"),
    "module.distill_loss": _choice("cosine", "mse"),
    "module.dropout": _either(_choice(None), _num(0.0, 0.999999)),
    "module.activation_checkpointing": _choice(True, False),
    "threads": _either(_choice(None), _int(1)),
    "seed": _int(0),
    "log_quant_every_n_steps": _int(0),
    "monitor_mode": _choice("min", "max"),
    "export.batches": _int(1),
    "export.max_rel_error": _num(0.0, open_lo=True),
    "export.min_top1_agreement": _num(0.0, 1.0),
    "export.min_cosine": _num(-1.0, 1.0),
    "export.onnx.target": _choice("any", "vnni", "avx2"),
    "callbacks.model_checkpoint.every_n_train_steps": _either(_choice(None), _int(1)),
    "ptq.method": _choice("rtn", "gptq"),
    "ptq.calibration_batches": _either(_choice(None), _int(1)),
    "ptq.percdamp": _num(0.0, 1.0, open_lo=True),
    "ptq.block_size": _int(1),
    "ptq.act_order": _choice(True, False),
    "ptq.sequential": _choice(True, False),
    "sensitivity.group_by": _choice("layer", "block"),
    "sensitivity.measure": _choice("loss", "kl", "sqnr"),
    "sensitivity.batches": _int(1),
    "sensitivity.calibration_batches": _int(1),
    "sensitivity.budget_bits_per_weight": _either(_choice(None), _num(0.0, open_lo=True)),
    "sensitivity.budget_mib": _either(_choice(None), _num(0.0, open_lo=True)),
    "sensitivity.budget_recipe": _choice(True, False),
}


def check_numbers(cfg: DictConfig) -> None:
    """Range-check every key of `NUMBERS` present in `cfg`."""
    for key, (ok, allowed) in NUMBERS.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>":
            continue
        if not ok(value):
            raise ValueError(f"{key}: got {value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class Job:
    """A checked run: the command and the objects built from the config for it."""

    cfg: DictConfig
    command: str
    objective: str
    model: ModelSpec
    recipe: Recipe
    plan: Plan | None = None  # train: the recipe against the model
    resume: Checkpoint | None = None  # train: continue this QAT run
    init_from: Checkpoint | None = None  # train: QAT from this float checkpoint
    checkpoint: Checkpoint | None = None  # eval / export
    artifact: Path | None = None  # eval: an exported artifact
    formats: tuple[str, ...] = ("qat",)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

    @property
    def threads(self) -> int:
        return int(self.cfg.get("threads") or os.cpu_count() or 1)


def _checkpoint_path(cfg: DictConfig, key: str = "ckpt_path") -> str | None:
    path = cfg.get(key)
    if path in (None, ""):
        return None
    if path == "last" and key == "ckpt_path":
        return str(find_last_checkpoint(Path(cfg.paths.log_dir) / str(cfg.run_name)))
    return str(path)


def _formats(cfg: DictConfig, model: ModelSpec) -> tuple[str, ...]:
    formats = list(cfg.export.get("formats") or ["qat"])
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"export.formats: got {f!r}; allowed: {', '.join(FORMATS)}")
    llama_config = (model.builder == "hf_causal_lm"
                    and (model.args.get("config") or {}).get("model_type") == "llama")  # fmt: skip
    if "gguf" in formats and model.builder not in GGUF_BUILDERS and not llama_config:
        raise ValueError(f"export.formats: gguf needs a Llama-family LM (model.builder: "
                         f"{', '.join(GGUF_BUILDERS)}, or hf_causal_lm with a llama config), got "
                         f"model.builder={model.builder}; drop gguf from export.formats")
    needs = {"onnx": ("onnx", "onnxruntime"), "gguf": ("gguf",)}
    for f in formats:
        missing = [m for m in needs.get(f, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"export.formats: {f} needs the package(s) {', '.join(missing)}: "
                             "pip install 'qat[onnx]', or drop it from export.formats")
    return tuple(["qat"] + [f for f in formats if f != "qat"])  # the gated artifact first


def check_target(what: str, cfg_objective: str, cfg_builder: str, objective: str | None,
                 builder: str | None) -> None:
    """A checkpoint or artifact is evaluated on this config's data: refuse one made for
    another objective or model (it would fail deep in a layer, or measure nonsense)."""
    if (objective is not None and objective != cfg_objective) or \
            (builder is not None and builder != cfg_builder):
        made = (f"objective {objective!r} with model builder {builder!r}" if objective
                else f"model {builder!r}")  # fmt: skip
        raise ValueError(
            f"{what} was made for {made}, but this config has "
            f"module.objective={cfg_objective!r} and "
            f"model.builder={cfg_builder!r}: evaluate it with the experiment it was trained "
            "with (e.g. experiment=minilm_w8a8_kd; the training run's overrides are in "
            "<run dir>/.hydra/overrides.yaml)"
        )


def _check_origin(ckpt: Checkpoint, objective: str, model: ModelSpec,
                  recipe: Recipe | None = None) -> None:
    """Refuse a checkpoint of another objective, model or (when given) recipe."""
    current: dict[str, Any] = {"objective": objective, "model": model.matching(ckpt.meta)}
    if recipe is not None:
        current["recipe"] = recipe.to_dict()
    check_meta(ckpt.meta, current)


def needs_teacher(cfg: DictConfig) -> bool:
    """Whether the QAT stage distils from the trained float model."""
    return cfg.module.objective == "embedding" or float(cfg.module.get("kd_weight") or 0) > 0


def _check_onnx_specs(plan: Plan, recipe_name: Any) -> None:
    """Refuse, before training, activations that the ONNX exporter cannot write."""
    for lp in plan.quantized():
        for role in ("input", "output"):
            s = lp.specs.get(role)
            if s is not None and s.dynamic and not writes_dynamic(s):
                raise ValueError(f"export.formats: onnx cannot quantize {lp.name}'s {role} as "
                                 f"recipe={recipe_name} asks ({s.describe()}); drop onnx from "
                                 "export.formats (gguf runs it) or use another recipe")


def calibration_count(job: Job) -> int:
    """Calibration batches: `ptq.calibration_batches` for `task=ptq` when set, else the
    recipe's `schedule.calibrate`."""
    n = job.cfg.get("ptq", {}).get("calibration_batches") if job.command == "ptq" else None
    return int(n) if n is not None else job.recipe.schedule.calibrate


def weight_method(job: Job) -> str:
    """How the weights get their first codes: `ptq.method` for `task=ptq`, else the recipe's
    `init` (`rtn` or `gptq`)."""
    if job.command == "ptq":
        return str(job.cfg.get("ptq", {}).get("method", "rtn"))
    return job.recipe.init


def _train_job(cfg: DictConfig, base: dict[str, Any]) -> Job:
    model, recipe, objective = base["model"], base["recipe"], base["objective"]
    probe = model.probe()  # its errors name model.args
    try:
        plan = qat.plan(probe, recipe)
    except ValueError as e:
        raise ValueError(f"recipe={cfg.get('recipe_name')} on model {model.builder}: {e}") from None
    if "onnx" in base["formats"]:
        _check_onnx_specs(plan, cfg.get("recipe_name"))
    resume = init_from = None
    path = _checkpoint_path(cfg)
    if path is not None:
        resume = Checkpoint.open(path, "ckpt_path")
        if resume.is_float:
            raise ValueError(f"ckpt_path={resume.path} is a float-stage checkpoint; to start "
                             "QAT from it use init_from=<it> instead of ckpt_path")
        _check_origin(resume, objective, model, recipe)
        teacher = resume.meta.get("float_checkpoint")
        if needs_teacher(cfg) and teacher:  # the distillation teacher of the resumed run
            Checkpoint.open(teacher, "the resumed run's float_checkpoint")
    elif cfg.get("init_from"):
        init_from = Checkpoint.open(cfg.init_from, "init_from")
        if not init_from.is_float:
            raise ValueError(
                f"init_from={init_from.path} is a QAT checkpoint; init_from takes the float "
                "stage's checkpoint (float/checkpoints/last.ckpt). To continue a QAT run use "
                "ckpt_path.")
        _check_origin(init_from, objective, model)
    command = str(cfg.get("task", "train"))
    if command == "ptq" and resume is not None:
        raise ValueError("task=ptq quantizes a float model: drop ckpt_path (init_from=<float "
                         "checkpoint> starts from a trained float model)")
    if command == "sensitivity":
        _check_sensitivity(cfg, resume, recipe, plan, probe)
    job = Job(cfg, command, plan=plan, resume=resume, init_from=init_from, **base)
    if weight_method(job) == "gptq" and command != "sensitivity":
        if "ptq" not in cfg:
            raise ValueError("GPTQ needs the ptq config group: add `- ptq: gptq` to the "
                             "config's defaults (configs/train.yaml has it)")
        if resume is None and calibration_count(job) == 0:
            raise ValueError(f"recipe={cfg.get('recipe_name')}: GPTQ needs calibration batches: "
                             "set recipe.schedule.calibrate (or ptq.calibration_batches) >= 1")
    return job


def _check_sensitivity(cfg: DictConfig, resume: Checkpoint | None, recipe: Recipe,
                       plan: Plan, probe: Any) -> None:  # fmt: skip
    sens = cfg.get("sensitivity")
    if sens is None:
        raise ValueError("task=sensitivity needs the sensitivity config group: add "
                         "`- sensitivity: default` to the config's defaults")
    if resume is not None:
        raise ValueError("task=sensitivity scans a float model: drop ckpt_path (init_from=<float "
                         "checkpoint> scans a trained float model)")
    if recipe.is_float():
        raise ValueError(f"recipe={cfg.get('recipe_name')} quantizes nothing: task=sensitivity "
                         "varies the weight widths of a quantizing recipe (e.g. recipe=w4g32)")
    bits = _int_list(sens, "bits", 2, 8, "[2, 3, 4, 8]")
    keys = ("budget_bits_per_weight", "budget_mib", "budget_uniform_bits", "budget_recipe")
    budgets = [k for k in keys if sens.get(k) not in (None, False)]
    if len(budgets) != 1:
        raise ValueError("sensitivity: set exactly one of budget_bits_per_weight (e.g. 4.5), "
                         "budget_mib, budget_uniform_bits (e.g. 4: the size with every scanned "
                         "weight at 4 bits), budget_recipe=true (the size the recipe itself "
                         f"gives them); got {budgets or 'none'}")
    uniform = sens.get("budget_uniform_bits")
    if uniform is not None and uniform not in bits:
        raise ValueError(f"sensitivity.budget_uniform_bits: got {uniform!r}; allowed: one of "
                         f"sensitivity.bits {bits}")
    _check_scan_activations(cfg, sens, plan)
    _check_candidates(cfg, sens, plan, probe, bits)


def _int_list(sens: DictConfig, key: str, low: int, high: int | None, example: str,
              empty_ok: bool = False) -> list[int]:  # fmt: skip
    """`sensitivity.<key>` as distinct integers in [low, high] (no upper bound: None)."""
    value = sens.get(key)
    top = high if high is not None else float("inf")
    listed = isinstance(value, Sequence) and not isinstance(value, str)
    ok = listed and (empty_ok or len(value) > 0) and len(set(value)) == len(value) and all(
        isinstance(v, int) and not isinstance(v, bool) and low <= v <= top for v in value)
    if not ok:
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"sensitivity.{key}: got {value!r}; allowed: a list of distinct "
                         f"integers {span}, e.g. {example}")
    return list(value)


def _check_scan_activations(cfg: DictConfig, sens: DictConfig, plan: Plan) -> None:
    """`activations=recipe` must have activation quantizers to keep on, and forward passes."""
    mode = sens.get("activations", "float")
    if mode not in ("float", "recipe"):
        raise ValueError(f"sensitivity.activations: got {mode!r}; allowed: float, recipe")
    if mode == "recipe" and sens.get("measure") == "sqnr":
        raise ValueError("sensitivity.activations=recipe: measure=sqnr looks at weights alone; "
                         "use measure=loss or kl, or activations=float")
    if mode == "recipe" and not any(lp.specs.get(r) for lp in plan.quantized()
                                    for r in ("input", "output")):  # fmt: skip
        raise ValueError(f"sensitivity.activations=recipe: recipe={cfg.get('recipe_name')} "
                         "quantizes no activations; use activations=float")


def _check_candidates(cfg: DictConfig, sens: DictConfig, plan: Plan, probe: Any,
                      bits: list[int]) -> None:  # fmt: skip
    """Every candidate width plans on the model (a group size must divide each per-group
    layer's rows), so none fails after the float model has trained."""
    sizes = [] if sens.get("group_sizes") is None else \
        _int_list(sens, "group_sizes", 1, None, "[32, 64]", empty_ok=True)  # fmt: skip
    grouped = {name for name, spec in plan.weight_specs().items() if is_grouped(spec)}
    if sizes and not grouped:
        raise ValueError(f"sensitivity.group_sizes: recipe={cfg.get('recipe_name')} has no "
                         "per_group weights to vary the group size of: set it to null, or "
                         "scan a per-group recipe (e.g. recipe=w4g32)")
    base = OmegaConf.to_container(cfg.recipe, resolve=True)
    for width in candidates(bits, sizes):
        try:
            qat.plan(probe, at_width(base, width, grouped))
        except ValueError as e:
            what = (f"bits: {width.bits}-bit weights" if not width.group_size else
                    f"group_sizes: groups of {width.group_size}")  # fmt: skip
            raise ValueError(f"sensitivity.{what} do not fit recipe={cfg.get('recipe_name')}: "
                             f"{e}") from None


def _eval_job(cfg: DictConfig, base: dict[str, Any]) -> Job:
    objective, model = base["objective"], base["model"]
    if cfg.get("artifact"):
        artifact = Path(cfg.artifact)
        try:
            manifest = read_manifest(artifact)
        except ValueError as e:
            raise ValueError(f"artifact={artifact}: {e}") from None
        check_target(f"artifact={artifact}", objective, model.builder,
                     objective_of(manifest.get("extra")), manifest["builder"]["name"])
        return Job(cfg, "eval", artifact=artifact, **base)
    path = _checkpoint_path(cfg)
    if path is None:
        raise ValueError("task=eval needs ckpt_path=<checkpoint> (or last) or artifact=<dir>")
    ckpt = Checkpoint.open(path, "ckpt_path")
    check_target(f"ckpt_path={path}", objective, model.builder, objective_of(ckpt.meta),
                 (ckpt.meta.get("model") or {}).get("builder"))
    return Job(cfg, "eval", checkpoint=ckpt, **base)


def _export_job(cfg: DictConfig, base: dict[str, Any]) -> Job:
    path = _checkpoint_path(cfg)
    if path is None:
        raise ValueError("task=export needs ckpt_path=<checkpoint> (or ckpt_path=last)")
    ckpt = Checkpoint.open(path, "ckpt_path")
    if ckpt.is_float:
        raise ValueError(f"ckpt_path={path} is a float checkpoint: there is nothing quantized "
                         "to export")
    check_target(f"ckpt_path={path}", base["objective"], base["model"].builder,
                 objective_of(ckpt.meta), (ckpt.meta.get("model") or {}).get("builder"))
    return Job(cfg, "export", checkpoint=ckpt, **base)


def preflight(cfg: DictConfig) -> Job:
    """Check `cfg` for its command and return the `Job`; `ValueError` on the first problem."""
    command = cfg.get("task", "train")
    if command not in COMMANDS:
        raise ValueError(f"task: got {command!r}; allowed: {', '.join(COMMANDS)}")
    check_numbers(cfg)
    try:
        recipe = Recipe.from_dict(cfg.recipe)
    except ValueError as e:
        raise ValueError(f"recipe ({cfg.get('recipe_name')}): {e}") from None
    model = ModelSpec.from_config(cfg)
    base = {
        "objective": str(cfg.module.objective),
        "model": model,
        "recipe": recipe,
        "formats": _formats(cfg, model) if command != "eval" else ("qat",),
    }
    jobs = {"train": _train_job, "ptq": _train_job, "sensitivity": _train_job,
            "eval": _eval_job, "export": _export_job}  # fmt: skip
    return jobs[command](cfg, base)
