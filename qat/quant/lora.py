"""LoRA for QAT: `LoraSpec` (the recipe's `lora:` block) and `LoRA` (one layer's adapters).

The adapters are merged into the weight *before* the weight quantizer:
`W_q = Q(W + (alpha / r) B A)`. The forward pass therefore trains exactly the grid points
`convert` exports, where adding `B A x` beside a quantized `W x` (peft on a quantized base)
would train a weight no integer export can hold. The keys are peft's (`r`, `lora_alpha`,
`lora_dropout`, `target_modules`, `exclude_modules`, `use_rslora`), and so are the target
matching (peft's `check_target_module_exists`) and the initialisation (A Kaiming-uniform,
B zero, so training starts at the base model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
             "use_rslora")  # fmt: skip


def _fail(path: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{path}: got {value!r}; allowed: {allowed}")


def _modules(value: Any, path: str) -> str | tuple[str, ...] | None:
    """peft's forms: a list (a module name or its last dotted parts) or one full-match regex."""
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise _fail(path, value, "a list of module names or name suffixes (q_proj), or one "
                "regular expression matched against the full module name")  # fmt: skip


@dataclass(frozen=True)
class LoraSpec:
    """A validated `lora:` block.

    Example:
        >>> s = LoraSpec.parse({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
        >>> s.scaling, s.target_modules
        (2.0, ('q_proj',))
    """

    r: int
    lora_alpha: float
    target_modules: str | tuple[str, ...]
    lora_dropout: float = 0.0
    exclude_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False

    @classmethod
    def parse(cls, raw: Any, path: str = "lora") -> LoraSpec:
        if not isinstance(raw, dict):
            raise _fail(path, raw, "a mapping with keys " + ", ".join(LORA_KEYS))
        for k in raw:
            if k not in LORA_KEYS:
                raise _fail(f"{path}.{k}", k, ", ".join(LORA_KEYS))
        r = raw.get("r", 8)  # peft's defaults: r 8, lora_alpha 8
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise _fail(f"{path}.r", r, "the adapters' rank, an integer >= 1")
        alpha = raw.get("lora_alpha", 8)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise _fail(f"{path}.lora_alpha", alpha, "a number > 0 (the update is scaled by "
                        "lora_alpha / r)")  # fmt: skip
        drop = raw.get("lora_dropout", 0.0)
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
            raise _fail(f"{path}.lora_dropout", drop, "a probability in [0, 1)")
        if "target_modules" not in raw:
            raise _fail(f"{path}.target_modules", None, "the layers that get adapters, e.g. "
                        "[q_proj, k_proj, v_proj, o_proj]")  # fmt: skip
        targets = _modules(raw["target_modules"], f"{path}.target_modules")
        exclude = _modules(raw.get("exclude_modules"), f"{path}.exclude_modules")
        rslora = raw.get("use_rslora", False)
        if not isinstance(rslora, bool):
            raise _fail(f"{path}.use_rslora", rslora, "true or false")
        return cls(r, float(alpha), targets, float(drop), exclude, rslora)

    @property
    def scaling(self) -> float:
        """peft's: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def peft_config(self) -> Any:
        """The same block as a `peft.LoraConfig` (imported here: peft loads transformers)."""
        from peft import LoraConfig

        def listed(v):
            return list(v) if isinstance(v, tuple) else v

        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=listed(self.target_modules),
                          exclude_modules=listed(self.exclude_modules),
                          use_rslora=self.use_rslora)  # fmt: skip

    def targets(self, names: list[str]) -> list[str]:
        """The names among `names` that peft's matching selects (exclusions applied)."""
        from peft.tuners.tuners_utils import check_target_module_exists

        cfg = self.peft_config()
        return [n for n in names if check_target_module_exists(cfg, n)]


class LoRA(nn.Module):
    """The low-rank update `scaling * B @ A` of one weight, seen as `(rows, cols)`.

    `rows` is the weight's output dimension and `cols` everything else flattened (a conv's
    `in * kH * kW`), the shapes peft uses for Linear and Conv. Dropout, when set, zeroes whole
    input columns of `A` for a step (scaled by `1 / (1 - p)`): one merged weight per step is
    what the quantizer must see, so peft's per-token dropout of `x` cannot be applied.

    Example:
        >>> lora = LoRA(rows=4, cols=8, r=2, scaling=1.0)
        >>> w = torch.randn(4, 8)
        >>> torch.equal(lora.merge(w), w)  # B starts at zero
        True
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.scaling, self.dropout = scaling, dropout
        self.A = nn.Parameter(torch.empty(r, cols, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(rows, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # peft's (and nn.Linear's) init

    def delta(self) -> torch.Tensor:
        """`scaling * B @ A` as a `(rows, cols)` matrix."""
        a = self.A
        if self.training and self.dropout > 0:
            keep = torch.empty(1, a.shape[1], dtype=a.dtype, device=a.device)
            a = a * keep.bernoulli_(1 - self.dropout) / (1 - self.dropout)
        return (self.B @ a) * self.scaling

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight + delta`, in `weight`'s shape and dtype (differentiable in A and B)."""
        return weight + self.delta().reshape(weight.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        return (f"rows={self.B.shape[0]}, cols={self.A.shape[1]}, r={self.A.shape[0]}, "
                f"scaling={self.scaling:g}, dropout={self.dropout:g}")  # fmt: skip
