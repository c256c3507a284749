"""`QATModule`: the LightningModule that trains a (prepared or float) model on one objective."""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from qat.models.hf import enable_activation_checkpointing
from qat.quant import FakeQuantizer, quantizers
from qat.quant.float_view import float_view
from qat.quant.tokens import observe_real_tokens
from qat.train.checkpoint import check_meta
from qat.train.objectives import (
    ObjectiveMetrics,
    check_objective,
    model_forward,
    objective_loss,
    token_mask,
)
from qat.train.sharding import shard


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, quant_lr_mult: float
) -> list[dict[str, Any]]:
    """Three groups: matrices (decayed), vectors (biases, norms: no decay), quantizer
    parameters (learned scales, offsets, clips: `lr * quant_lr_mult`, no decay)."""
    quant_ids = {
        id(p) for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()
    }
    decay, no_decay, quant, seen = [], [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quant_ids:
            quant.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": "vectors"},
        {"params": quant, "weight_decay": 0.0, "lr": lr * quant_lr_mult, "name": "quantizers"},
    ]
    return [g for g in groups if g["params"]]


def rng_state() -> dict[str, Any]:
    """Every RNG the training step may touch, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def set_dropout(model: nn.Module, p: float) -> int:
    """Set the probability of every `nn.Dropout`-family layer in `model` to `p`; returns how many.

    Distilling a pretrained model towards its own float outputs needs `p=0`: with dropout the
    target is out of reach and the dropout noise (cosine loss ~5e-2 on MiniLM) drowns the
    quantization error the student should learn to undo (~9e-3). BERT-style attention in
    transformers reads its `nn.Dropout`'s `p`, so it is covered; attention that keeps its
    probability as a plain float (Llama's `attention_dropout`, 0 by default) is not changed.
    """
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"module.dropout: got {p!r}; use a probability in [0, 1) or null "
                         "to keep the model's own dropout")
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m in layers:
        m.p = float(p)
    if not layers:
        warnings.warn(f"module.dropout={p}: {type(model).__name__} has no dropout layers",
                      stacklevel=2)
    return len(layers)


class QATModule(L.LightningModule):
    """Trains `model` for `objective` (`classification`, `causal_lm`, `embedding`).

    `teacher` (a frozen float copy) enables distillation: required for `embedding`, optional
    (`kd_weight > 0`) for the others. `distill_from_base=True` distils from `model` itself
    seen as float (`float_view`) instead: under LoRA-QAT its base weights never change, so no
    copy is kept. `meta` (builder, recipe) is stored in checkpoints and
    checked on load, so a checkpoint of another model or recipe fails with a clear message.
    `dropout` (not None) sets every dropout layer's probability (see `set_dropout`).

    Example:
        >>> m = QATModule(nn.Linear(4, 3), objective="classification", num_classes=3)
        >>> m.training_step({"x": torch.randn(8, 4), "y": torch.zeros(8, dtype=torch.long)}, 0)
        tensor(..., grad_fn=<NllLossBackward0>)
    """

    def __init__(
        self,
        model: nn.Module,
        objective: str,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        quant_lr_mult: float = 1.0,
        optimizer: str = "adamw",
        warmup_steps: int = 0,
        cosine: bool = True,
        max_steps: int | None = None,
        num_classes: int | None = None,
        teacher: nn.Module | None = None,
        kd_weight: float = 0.0,
        kd_temperature: float = 2.0,
        distill_loss: str = "cosine",
        dropout: float | None = None,
        activation_checkpointing: bool = False,
        distill_from_base: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        if dropout is not None:
            set_dropout(model, dropout)
        if activation_checkpointing:
            enable_activation_checkpointing(model)
        self.recomputes = activation_checkpointing
        self._observing = contextlib.ExitStack()
        self.objective = check_objective(objective)
        self.lr, self.weight_decay, self.quant_lr_mult = lr, weight_decay, quant_lr_mult
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"module.optimizer: got {optimizer!r}; allowed: adamw, sgd")
        self.optimizer_name, self.warmup_steps, self.cosine = optimizer, warmup_steps, cosine
        self.max_steps = max_steps
        if distill_loss not in ("cosine", "mse"):
            raise ValueError(f"module.distill_loss: got {distill_loss!r}; allowed: cosine, mse")
        self.kd_weight, self.kd_temperature, self.distill_loss = (
            kd_weight,
            kd_temperature,
            distill_loss,
        )
        # A list hides the teacher from state_dict, parameters() and the optimizer.
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        self.distill_from_base = distill_from_base
        self.meta = dict(meta or {})
        self.metrics = nn.ModuleDict(
            {s: ObjectiveMetrics(objective, num_classes) for s in ("train_", "val", "test")}
        )

    def configure_model(self) -> None:
        """Under FSDP (`trainer=fsdp_*`, which sets a device mesh) shard the model across the
        data-parallel ranks; nothing otherwise."""
        if self.device_mesh is not None:
            shard(self.model, self.device_mesh["data_parallel"])

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_forward(self.objective, self.model, batch)

    def _teacher_out(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        needs = self.objective == "embedding" or self.kd_weight > 0
        if not needs:
            return None
        if self.distill_from_base:
            with torch.no_grad(), float_view(self.model):
                return model_forward(self.objective, self.model, batch)
        if self.teacher is None:
            return None
        with torch.no_grad():
            return model_forward(self.objective, self.teacher.to(self.device), batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Observers still updating (before freeze_observers) see the real tokens only; with
        # activation checkpointing also in the forward that backward re-runs, so until
        # on_after_backward.
        real = observe_real_tokens(self.model, token_mask(self.objective, batch))
        if not self.recomputes:
            with real:
                return self._training_loss(batch)
        self._observing.enter_context(real)
        try:
            return self._training_loss(batch)
        except BaseException:
            self._observing.close()
            raise

    def on_after_backward(self) -> None:
        self._observing.close()

    def _training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self(batch)
        loss = objective_loss(
            self.objective,
            out,
            batch,
            self._teacher_out(batch),
            self.kd_weight,
            self.kd_temperature,
            self.distill_loss,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(self._diverged_message(loss))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(out))
        return loss

    def _diverged_message(self, loss: torch.Tensor) -> str:
        worst = []
        for name, q in quantizers(self.model).items():
            if q.observer is None:
                continue
            s, _ = q.qparams()
            bad = not torch.isfinite(s).all() or bool((s <= 0).any())
            clip = q.last_clip_fraction
            worst.append((bad, clip or 0.0, name, float(s.detach().abs().max())))
        msg = f"loss is {loss.item()} at step {self.global_step}: training diverged."
        if worst:
            bad, clip, name, smax = max(worst)
            msg += f" Most suspicious quantizer: {name} (scale max {smax:.3g}"
            msg += f", clip fraction {clip:.2%})" if clip else ")"
        return msg + ". Lower the learning rate (or module.quant_lr_mult) and resume."

    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        out = self(batch)
        self.metrics[split].update(
            out, batch, self._teacher_out(batch) if self.objective == "embedding" else None
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_split(self, split: str) -> None:
        for k, v in self.metrics[split].compute().items():
            self.log(f"{split}/{k}", v, prog_bar=(split == "val"), sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def configure_optimizers(self) -> Any:
        groups = param_groups(self.model, self.lr, self.weight_decay, self.quant_lr_mult)
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(groups, lr=self.lr)
        total = self.max_steps or self.trainer.max_steps
        warm = self.warmup_steps

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            if not self.cosine or not total or total <= 0:
                return 1.0
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * t)) * 0.9 + 0.1

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["qat_meta"] = self.meta
        checkpoint["qat_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_meta(checkpoint.get("qat_meta"), self.meta)
        if "qat_rng" in checkpoint:
            set_rng_state(checkpoint["qat_rng"])
