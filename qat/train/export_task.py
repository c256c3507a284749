"""Export from training: at the end of a run (`export.enabled`), `task=export ckpt_path=...`,
and evaluation of an exported artifact (`task=eval artifact=DIR`)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

import qat
from qat.export import export_model, read_manifest
from qat.models.registry import build_model
from qat.train.tasks import model_forward

FORMATS = ("qat", "onnx", "gguf")


def _formats(cfg: DictConfig) -> list[str]:
    formats = list(cfg.export.get("formats") or ["qat"])
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"export.formats: got {f!r}; allowed: {', '.join(FORMATS)}")
    if "qat" not in formats:
        formats.insert(0, "qat")  # the parity-gated integer artifact is always written
    return formats


def export_trained(
    cfg: DictConfig, model: torch.nn.Module, dm: Any, out_dir: Path
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Convert, gate on validation batches, save `export/qat`, plus ONNX / GGUF if asked.

    Returns the integer model and a summary (paths, parity figures). A parity failure raises
    `ParityError` with the report, and nothing is saved.
    """
    task = str(cfg.module.task)
    exp = cfg.export
    formats = _formats(cfg)
    model.eval()
    model.apply(qat.quant.disable_observer)
    batches = list(islice(iter(dm.val_dataloader()), int(exp.get("batches", 1))))

    def forward(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return model_forward(task, m, b)

    embedding = task == "embedding"
    int_model, report, path = export_model(
        model,
        batches,
        out_dir / "export" / "qat",
        forward=forward,
        max_rel_error=float(exp.max_rel_error),
        min_top1_agreement=None if embedding else float(exp.min_top1_agreement),
        min_cosine=float(exp.get("min_cosine", 0.9999)) if embedding else None,
        extra={"task": task, "run_name": str(cfg.get("run_name"))},
        overwrite=True,
    )
    out: dict[str, Any] = {"qat": str(path), "parity": report.to_dict()}
    if "gguf" in formats:
        from qat.export.gguf import write_gguf

        vocab = list(dm.vocab) if hasattr(dm, "vocab") else None
        out["gguf"] = str(write_gguf(model, out_dir / "export" / "model.gguf", vocab=vocab))
    if "onnx" in formats:
        from qat.export.onnx import export_onnx
        from qat.export.onnx_parity import onnx_parity

        inputs = [_as_inputs(task, b) for b in batches]
        names = ["input_ids", "attention_mask"] if embedding else ["x"]
        onnx_path = export_onnx(int_model, inputs[0], out_dir / "export" / "model.onnx", names)
        out["onnx"] = str(onnx_path)
        out["onnx_parity"] = onnx_parity(int_model, onnx_path, inputs)
    return int_model, out


def _as_inputs(task: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if task == "embedding":
        return (batch["input_ids"], batch["attention_mask"])
    return (batch["x"],)


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The prepared model a qat checkpoint describes, with its trained state."""
    from qat.train.checkpoint import model_state

    meta = ckpt.get("qat_meta") or {}
    if "model" not in meta:
        raise ValueError("checkpoint has no qat metadata: it was not written by qat's trainer")
    model = build_model(meta["model"]["builder"], **meta["model"]["args"])
    if meta.get("recipe") is not None:
        qat.prepare(model, meta["recipe"])
    model.load_state_dict(model_state(ckpt))
    return model


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """`task=export ckpt_path=...`: export a training checkpoint into the run dir."""
    from qat.train.checkpoint import load_checkpoint
    from qat.train.report import write_json_atomic
    from qat.train.run import build_data, resolve_ckpt

    ckpt_path = resolve_ckpt(cfg)
    if ckpt_path is None:
        raise ValueError("task=export needs ckpt_path=<checkpoint> (or ckpt_path=last)")
    ckpt = load_checkpoint(ckpt_path)
    if (ckpt.get("qat_meta") or {}).get("recipe") is None:
        raise ValueError(f"{ckpt_path} is a float checkpoint: there is nothing quantized to export")
    model = model_from_checkpoint(ckpt)
    dm = build_data(cfg)
    out_dir = Path(cfg.paths.output_dir)
    _, summary = export_trained(cfg, model, dm, out_dir)
    summary["checkpoint"] = ckpt_path
    write_json_atomic(out_dir / "export" / "summary.json", summary)
    print(f"exported {ckpt_path} -> {summary['qat']}")
    return summary


def teacher_for_artifact(directory: str | Path) -> torch.nn.Module:
    """The float model an artifact was made from (for the embedding task's metric)."""
    b = read_manifest(directory)["builder"]
    return build_model(b["name"], **b["args"])
