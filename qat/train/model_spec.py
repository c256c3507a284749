"""`ModelSpec`: the model a config names (a registered builder and its JSON arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qat.models.registry import build_model

AUTO_ARGS = ("vocab_size", "num_classes")  # sizes the data decides (model.args.X: auto)
# `auto` sizes only an output layer or a vocabulary: a plan is checked with this stand-in.
STAND_IN_SIZE = 64


@dataclass(frozen=True)
class ModelSpec:
    """A registered builder and its JSON arguments; `auto` values come from the data.

    Example:
        >>> spec = ModelSpec("cnn", {"widths": [8], "num_classes": "auto"})
        >>> spec.probe().head.out_features, spec.with_sizes(num_classes=10).args["num_classes"]
        (64, 10)
    """

    builder: str
    args: dict[str, Any]

    def __post_init__(self) -> None:
        for key, value in self.args.items():
            if value == "auto" and key not in AUTO_ARGS:
                raise ValueError(f"model.args.{key}: got 'auto'; allowed: auto only for "
                                 f"{', '.join(AUTO_ARGS)} (sizes the data decides)")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ModelSpec:
        args = cfg.model.get("args")
        args = OmegaConf.to_container(args, resolve=True) if args is not None else {}
        return cls(str(cfg.model.builder), dict(args))

    def resolved(self, datamodule: Any) -> ModelSpec:
        """`auto` arguments filled from the datamodule's attributes of the same name."""
        sizes = {}
        for key in AUTO_ARGS:
            if self.args.get(key) == "auto":
                if not hasattr(datamodule, key):
                    raise ValueError(f"model.args.{key}=auto but data "
                                     f"{type(datamodule).__name__} has no {key}")
                sizes[key] = int(getattr(datamodule, key))
        return self.with_sizes(**sizes)

    def with_sizes(self, **sizes: int) -> ModelSpec:
        return ModelSpec(self.builder, {**self.args, **sizes})

    def as_dict(self) -> dict[str, Any]:
        return {"builder": self.builder, "args": dict(self.args)}

    def build(self) -> torch.nn.Module:
        """The model; a builder's complaint about its arguments names `model.args`."""
        try:
            return build_model(self.builder, **self.args)
        except TypeError as e:  # an argument the builder does not take
            raise ValueError(f"model.args ({self.builder}): {e}") from None

    def probe(self) -> torch.nn.Module:
        """The model with stand-in sizes for `auto`, for planning, built without touching the
        global RNG (the real model is built after seeding). On the CPU: the meta device would
        spare the memory but costs seconds to set up, more than the small models here take."""
        spec = ModelSpec(self.builder,
                         {k: STAND_IN_SIZE if v == "auto" else v for k, v in self.args.items()})
        with torch.random.fork_rng(devices=[]):
            return spec.build()

    def matching(self, meta: dict[str, Any]) -> dict[str, Any]:
        """This spec as a dict, `auto` arguments taken from a checkpoint's `meta` (the data
        decides them, so they match whatever the checkpoint's run found)."""
        saved = (meta.get("model") or {}).get("args") or {}
        args = {k: saved.get(k, v) if v == "auto" else v for k, v in self.args.items()}
        return {"builder": self.builder, "args": args}
