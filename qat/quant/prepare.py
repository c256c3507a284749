"""`prepare()`: swap float layers for fake-quant layers in place, as a recipe says."""

from __future__ import annotations

import warnings

from torch import nn

from qat.quant.bn_fold import merge_bn
from qat.quant.fake_quant import FakeQuantizer
from qat.quant.family import Families
from qat.quant.lora import LoRA, LoraSpec
from qat.quant.modules import QATMixin
from qat.quant.plan import Plan, plan
from qat.quant.provenance import provenance, record
from qat.quant.recipe import Recipe


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def is_prepared(model: nn.Module) -> bool:
    return provenance(model).recipe is not None or any(
        isinstance(m, QATMixin) for m in model.modules()
    )


def prepare(model: nn.Module, recipe: Recipe | dict | str, families: Families) -> nn.Module:
    """Insert fake quantization into `model` in place and return it.

    Parameters are shared with the float layers, so an optimizer built before `prepare` keeps
    working. BatchNorm after a quantized conv is folded (simulated, `bn: fold`), merged into the
    conv now (`merge`) or left alone (`keep`). The recipe and plan go into the model's
    `Provenance`. `families` says which layer types can be quantized (`qat.prepare` passes
    the shipped ones).

    Example:
        >>> import qat
        >>> m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> m = qat.prepare(m, {"rules": [{"match": {"types": ["Linear"]},
        ...                                "weight": {"bits": 4}}]})
        >>> type(m[0]).__name__
        'QATLinear'
    """
    if is_prepared(model):
        raise ValueError(
            f"{type(model).__name__} is already prepared for QAT; prepare a fresh float model "
            "(or load its state_dict into one prepared with the same recipe)"
        )
    result: Plan = plan(model, recipe, families)
    if result.unquantizable:
        warnings.warn(result.float_note(), stacklevel=2)
    for lp in result.quantized():
        mod = model.get_submodule(lp.name)
        cls = families.qat_class_for(mod)
        specs = {role: lp.specs[role] for role in ("weight", "input", "output")}
        if lp.bn is not None:
            bn = model.get_submodule(lp.bn)
            if result.recipe.bn == "merge":
                merge_bn(mod, bn)
                new = cls.from_float(mod, **specs, name=lp.name)
            else:
                new = families.conv_bn_class(cls).from_conv_bn(mod, bn, **specs, name=lp.name)
            _set(model, lp.bn, nn.Identity())
        else:
            new = cls.from_float(mod, **specs, name=lp.name)
        new.train(mod.training)
        _set(model, lp.name, new)
    if result.recipe.lora is not None:
        attach_lora(model, result.recipe.lora, result.lora_targets)
    record(model, recipe=result.recipe, plan=result, families=families)
    return model


def attach_lora(model: nn.Module, spec: LoraSpec, names: list[str]) -> None:
    """Give each prepared layer in `names` (`Plan.lora_targets`) a `LoRA`, then freeze
    everything but the adapters and the learned quantizer parameters."""
    for n in names:
        mod = model.get_submodule(n)
        rows, cols = mod.lora_shape()
        mod.lora = LoRA(rows, cols, spec.r, spec.scaling, spec.lora_dropout,
                        dtype=mod.weight.dtype, device=mod.weight.device)  # fmt: skip
        mod.lora.train(mod.training)
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, (LoRA, FakeQuantizer)):
            m.requires_grad_(True)
