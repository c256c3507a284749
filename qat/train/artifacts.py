"""The files a run exports (parity-gated integer artifact, ONNX, GGUF) and reading them back.

Used at the end of training, by `task=export ckpt_path=...` and by `task=eval artifact=DIR`.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch

import qat
from qat.export import export_model, read_manifest
from qat.models.registry import build_model
from qat.train.checkpoint import model_state
from qat.train.console import say
from qat.train.objectives import model_forward
from qat.train.preflight import Job


def export_trained(job: Job, model: torch.nn.Module, dm: Any) -> tuple[torch.nn.Module, dict]:
    """Convert, gate on validation batches, save `export/qat`, plus ONNX / GGUF if asked.

    Returns the integer model and a summary (paths, parity figures). A parity failure raises
    `ParityError` with the report, and nothing is saved.
    """
    objective, exp, out_dir = job.objective, job.cfg.export, job.out_dir
    model.eval()
    model.apply(qat.quant.disable_observer)
    batches = list(islice(iter(dm.val_dataloader()), int(exp.get("batches", 1))))

    def forward(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return model_forward(objective, m, b)

    embedding = objective == "embedding"
    int_model, report, path = export_model(
        model,
        batches,
        out_dir / "export" / "qat",
        forward=forward,
        max_rel_error=float(exp.max_rel_error),
        min_top1_agreement=None if embedding else float(exp.min_top1_agreement),
        min_cosine=float(exp.get("min_cosine", 0.9999)) if embedding else None,
        extra={"objective": objective, "run_name": str(job.cfg.get("run_name"))},
        overwrite=True,
    )
    out: dict[str, Any] = {"qat": str(path), "parity": report.to_dict()}
    if "gguf" in job.formats:
        from qat.export.gguf import write_gguf

        tokenizer = getattr(dm, "tokenizer_file", None)  # a pretrained tokenizer's GGUF
        vocab = list(dm.vocab) if tokenizer is None and hasattr(dm, "vocab") else None
        gguf_path = write_gguf(int_model, out_dir / "export" / "model.gguf", vocab=vocab,
                               tokenizer_from=tokenizer)  # fmt: skip
        out["gguf"] = str(gguf_path)
        out["gguf_parity"] = _gate_gguf(int_model, gguf_path, batches, objective)
    if "onnx" in job.formats:
        from qat.export.onnx import export_onnx
        from qat.export.onnx.parity import gate_onnx

        inputs = [_as_inputs(objective, b) for b in batches]
        names = ["input_ids", "attention_mask"] if embedding else ["x"]
        target = str(exp.get("onnx", {}).get("target", "any"))
        onnx_path = export_onnx(int_model, inputs[0], out_dir / "export" / "model.onnx", names,
                                target=target)
        out["onnx_parity"] = gate_onnx(
            int_model, onnx_path, inputs, float(exp.max_rel_error),
            None if embedding else float(exp.min_top1_agreement),
            float(exp.get("min_cosine", 0.9999)) if embedding else None,
        )  # fmt: skip
        out["onnx"] = str(onnx_path)
    return int_model, out


def _gate_gguf(int_model: torch.nn.Module, path: Any, batches: list, objective: str) -> Any:
    """llama.cpp on the gate's validation tokens against the integer model (`gate_gguf`)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "not checked: llama-cpp-python is not installed (make setup builds it)"
    from qat.export.gguf.parity import gate_gguf

    def forward(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model_forward(objective, m, {"x": ids})

    result = gate_gguf(int_model, path, [b["x"] for b in batches], forward)
    free = f"rel {result['rel']:.1e}, top-1 {result['top1']:.4f}"
    if result["exact"]:
        tied = result["aligned"]
        say(f"GGUF gate (llama.cpp): rel {tied['rel']:.1e}, top-1 {tied['top1']:.4f} with "
            f"{result['aligned_codes']} rounding ties decided as llama.cpp did; free-running "
            f"{free}")  # fmt: skip
    else:
        say(f"GGUF gate (llama.cpp, which rounds float activations to 8 bits): {free}")
    return result


def _as_inputs(objective: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if objective == "embedding":
        return (batch["input_ids"], batch["attention_mask"])
    return (batch["x"],)


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The prepared model a qat checkpoint describes, with its trained state."""
    meta = ckpt.get("qat_meta") or {}
    if "model" not in meta:
        raise ValueError("checkpoint has no qat metadata: it was not written by qat's trainer")
    model = build_model(meta["model"]["builder"], **meta["model"]["args"])
    if meta.get("recipe") is not None:
        qat.prepare(model, meta["recipe"])
    model.load_state_dict(model_state(ckpt))
    return model


def float_model_of(directory: Any) -> torch.nn.Module:
    """The float model an artifact was made from (for the embedding objective's metric)."""
    b = read_manifest(directory)["builder"]
    return build_model(b["name"], **b["args"])
