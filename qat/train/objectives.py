"""Training objectives (`module.objective`: classification, causal_lm, embedding): how a batch
goes through the model, the loss, and the metrics."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

OBJECTIVES = ("classification", "causal_lm", "embedding")
METRIC = {"classification": "acc", "causal_lm": "ppl", "embedding": "cosine"}  # per objective


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"module.objective: got {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    return objective


def model_forward(objective: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (classification (B, C), causal_lm (B, T, V)) or embeddings (B, H)."""
    if objective == "embedding":
        return model(batch["input_ids"], batch["attention_mask"])
    return model(batch["x"])


def token_mask(objective: str, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The (B, T) mask of real tokens in a padded batch (sentences), or None (every position
    is data: images, fixed-length text windows)."""
    return batch["attention_mask"] if objective == "embedding" else None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation term: `T^2 * KL(softmax(t/T) || softmax(s/T))`."""
    s = F.log_softmax(student.flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher.flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher)


def objective_loss(
    objective: str,
    out: torch.Tensor,
    batch: dict[str, torch.Tensor],
    teacher_out: torch.Tensor | None,
    kd_weight: float,
    kd_temperature: float,
    distill_loss: str,
) -> torch.Tensor:
    if objective == "embedding":
        if teacher_out is None:
            raise ValueError("the embedding objective distills from a float teacher: none given")
        return embedding_loss(out, teacher_out, distill_loss)
    target = batch["y"]
    ce = F.cross_entropy(out.flatten(0, -2), target.flatten())
    if teacher_out is None or kd_weight <= 0:
        return ce
    return (1 - kd_weight) * ce + kd_weight * kd_loss(out, teacher_out, kd_temperature)


class ObjectiveMetrics(nn.Module):
    """Per-split metric state: accuracy, perplexity, or cosine similarity to the teacher.

    Never synced across processes: every rank evaluates the whole split (validation loaders
    are not sharded), and rank 0 alone evaluates after training, so a sync would wait on
    ranks that have finished.
    """

    def __init__(self, objective: str, num_classes: int | None = None) -> None:
        super().__init__()
        self.objective = objective
        local = {"sync_on_compute": False}
        if objective == "classification":
            self.metric = torchmetrics.classification.MulticlassAccuracy(
                num_classes=num_classes or 2, average="micro", **local
            )
        elif objective == "causal_lm":
            self.metric = torchmetrics.text.Perplexity(**local)
        else:
            self.metric = torchmetrics.MeanMetric(**local)
        self.loss = torchmetrics.MeanMetric(**local)

    @property
    def name(self) -> str:
        return METRIC[self.objective]

    def update(
        self, out: torch.Tensor, batch: dict[str, Any], teacher_out: torch.Tensor | None
    ) -> None:
        if self.objective == "classification":
            self.metric.update(out, batch["y"])
            self.loss.update(F.cross_entropy(out, batch["y"]), weight=len(out))
        elif self.objective == "causal_lm":
            self.metric.update(out.float(), batch["y"])
            loss = F.cross_entropy(out.flatten(0, -2).float(), batch["y"].flatten())
            self.loss.update(loss, weight=batch["y"].numel())
        else:
            cos = F.cosine_similarity(out, teacher_out, dim=-1)
            self.metric.update(cos)
            self.loss.update((1 - cos).mean(), weight=len(cos))

    def compute(self) -> dict[str, float]:
        value = float(self.metric.compute())
        loss = float(self.loss.compute())
        self.metric.reset(), self.loss.reset()
        if self.objective == "causal_lm" and not math.isfinite(value):
            value = float("inf")
        return {self.name: value, "loss": loss}


def higher_is_better(objective: str) -> bool:
    return objective != "causal_lm"
