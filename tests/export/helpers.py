"""Small trained fake-quant models for the export tests (nothing is downloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.models.registry import build_model
from qat.quant import disable_observer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipe"
SHIPPED = sorted(p.stem for p in RECIPES.glob("*.yaml"))
LLAMA = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
BERT = {
    "model_type": "bert",
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


@dataclass
class Case:
    """How to build, feed and train one kind of model."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], torch.Tensor]
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _ce(logits: torch.Tensor, classes: int) -> torch.Tensor:
    target = torch.arange(logits[..., 0].numel()) % classes
    return F.cross_entropy(logits.reshape(-1, classes), target)


def _bert() -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(**{k: v for k, v in BERT.items() if k != "model_type"})
    return transformers.BertModel(cfg)


def _bert_loss(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
    out = m(input_ids=b)  # the pooler too, so every Linear runs
    return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()


CASES: dict[str, Case] = {
    "cnn": Case(
        lambda: build_model("cnn", widths=[8, 32]),
        lambda g: torch.randn(8, 1, 8, 8, generator=g),
        lambda m, b: _ce(m(b), 10),
    ),
    "gpt": Case(
        lambda: build_model("gpt", preset="tiny", vocab_size=67, block_size=32),
        lambda g: torch.randint(0, 67, (2, 32), generator=g),
        lambda m, b: _ce(m(b), 67),
    ),
    "llama": Case(
        lambda: build_model("hf_causal_lm", config=LLAMA, seed=0),
        lambda g: torch.randint(0, 100, (2, 16), generator=g),
        lambda m, b: _ce(m(b), 100),
    ),
    "bert": Case(
        _bert,
        lambda g: torch.randint(0, 100, (2, 16), generator=g),
        _bert_loss,
    ),
}


def recipe(name: str, **overrides) -> qat.Recipe:
    return qat.Recipe.from_dict(
        {**qat.Recipe.from_yaml(RECIPES / f"{name}.yaml").to_dict(), **overrides}
    )


def trained(
    kind: str, recipe_: qat.Recipe | dict, steps: int = 2, seed: int = 0
) -> tuple[nn.Module, list[torch.Tensor]]:
    """A model of `kind` prepared with `recipe_`, trained a few steps with observers on (the
    first step calibrates), then observers frozen and eval mode; plus two held-out batches."""
    case = CASES[kind]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = qat.prepare(case.build(), recipe_).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        case.loss(model, case.batch(g)).backward()
        opt.step()
    model.apply(disable_observer)
    return model.eval(), [case.batch(g) for _ in range(2)]


def assert_onnx_exact(int_model: nn.Module, batches: list[tuple[torch.Tensor, ...]], path: Path,
                      input_names: list[str] | None = None) -> None:
    """Export `int_model` to ONNX and pass the export gate: ONNX Runtime on this CPU computes
    what the integer executor computes on `batches` (skipped without onnxruntime)."""
    import pytest

    pytest.importorskip("onnxruntime")
    from qat.export.onnx import export_onnx
    from qat.export.onnx.parity import gate_onnx

    onnx_path = export_onnx(int_model, batches[0], path, input_names=input_names)
    result = gate_onnx(int_model, onnx_path, batches)
    assert result["failures"] == [] and result["top1"] == 1.0, result["failures"]
