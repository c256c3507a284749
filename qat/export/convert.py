"""`convert()`: a prepared (fake-quant) model -> a new model of integer layers."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qat.export.integer.layer import IntLayer
from qat.quant.fake_quant import FakeQuantizer
from qat.quant.family import Families
from qat.quant.modules import QATMixin
from qat.quant.provenance import provenance, record


class ConvertError(ValueError):
    """A fake-quant layer cannot be turned into an integer layer as it stands."""


def _usable(fq: FakeQuantizer | None, layer: str) -> FakeQuantizer | None:
    """`fq` if it is ready to export; a clear error naming the layer otherwise."""
    if fq is None:
        return None
    if not bool(fq.fake_quant_enabled):
        raise ConvertError(
            f"{layer}: the {fq.role} quantizer has fake quant switched off, so the trained model "
            "computes this tensor in float; enable it (qat.quant.enable_fake_quant) and train or "
            "evaluate with it before exporting"
        )
    if not fq.spec.dynamic and not bool(fq.calibrated):
        raise ConvertError(
            f"{layer}: the {fq.role} quantizer was never calibrated (it has seen no data), so it "
            "has no scale to export; run calibration (qat.quant.calibrate) or training steps "
            "with observers on first. If the model never calls this layer (an unused pooler, "
            "say), add it to the recipe's `ignore` list"
        )
    return fq


def _qparams(fq: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    s, z = fq.qparams()
    return s.detach().float().clone(), z.detach().float().clone()


def _spec(fq: FakeQuantizer | None):
    return None if fq is None else fq.spec


@torch.no_grad()
def int_layer_from_qat(mod: QATMixin, name: str, families: Families) -> IntLayer:
    """The integer layer computing what the fake-quant layer `mod` computes in eval mode."""
    wq = _usable(mod.weight_quant, name)
    iq = _usable(mod.input_quant, name)
    oq = _usable(mod.output_quant, name)
    weight, bias = mod.export_weight(), mod.export_bias()
    try:
        int_type = families.of_qat(mod).int_type
    except KeyError as e:
        raise ConvertError(f"{name}: {e.args[0]}; add its LayerFamily to the families") from None
    if int_type is None:
        raise ConvertError(f"{name}: the layer family of {type(mod).__name__} has no integer "
                           "class, so it cannot be exported")  # fmt: skip
    try:
        new: IntLayer = int_type.from_qat(mod, _spec(wq), _spec(iq), _spec(oq))
    except ValueError as e:
        raise ConvertError(f"{name}: {e}") from None
    new.to(weight.device)
    new.set_weight(weight, *(_qparams(wq) if wq is not None else ()))
    for role, fq in (("input", iq), ("output", oq)):
        if fq is not None and not fq.spec.dynamic:
            new.set_act_qparams(role, *_qparams(fq))
    if bias is not None:
        new.set_bias(bias)  # after the scales: its grid's step is s_x * s_w
    return new


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def float32_state_bytes(model: nn.Module) -> int:
    """Bytes of the model's float32 `state_dict`, quantizer state left out (the size baseline)."""
    skip = {
        f"{name}.{key}"
        for name, mod in model.named_modules()
        if isinstance(mod, FakeQuantizer)
        for key in mod.state_dict()
    }
    total, seen = 0, set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key in skip or key.endswith(".bn_frozen") or t.data_ptr() in seen:
            continue  # tied parameters count once
        seen.add(t.data_ptr())
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


def convert(model: nn.Module) -> nn.Module:
    """A new model with every fake-quant layer replaced by its integer layer (the integer class
    of its layer family, from the families the model was prepared with).

    The prepared model is not changed. BatchNorm simulated-folded during QAT (`bn: fold`) is
    folded into the integer conv with exactly the weights training quantized; `merge` was folded
    before QAT; `keep` leaves the float BatchNorm after the integer conv. Static activation
    scales are the quantizers' current (frozen or learned) values; dynamic ones stay dynamic.
    Raises `ConvertError` (a `ValueError`) naming the layer when a quantizer was never
    calibrated or has fake quant off.

    Example:
        >>> import qat
        >>> m = qat.prepare(nn.Sequential(nn.Linear(8, 4)), {"rules": [
        ...     {"match": {"types": ["Linear"]}, "weight": {"bits": 4}, "input": {"bits": 8}}]})
        >>> _ = m(torch.randn(2, 8))            # calibrates (observers on, train mode)
        >>> type(convert(m.eval())[0]).__name__
        'IntLinear'
    """
    origin = provenance(model)
    if origin.recipe is None or origin.families is None:
        raise ConvertError(
            f"{type(model).__name__} is not prepared for QAT; call qat.prepare(model, recipe) "
            "and train (or calibrate) it before qat.convert"
        )
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QATMixin)]
    # Every layer converts before anything is copied: a failure leaves nothing half-done.
    new_layers = {n: int_layer_from_qat(m, n, origin.families) for n, m in layers}
    memo = {id(m): new_layers[n] for n, m in layers}  # deepcopy puts the int layers in place
    int_model = copy.deepcopy(model, memo)
    for name, new in new_layers.items():
        _set(int_model, name, new)  # also where deepcopy met the layer under another name
    plan = origin.plan
    # BatchNorms folded or merged into a conv: Identity in the model, BatchNorm in a fresh build.
    folded = tuple(lp.bn for lp in plan.quantized() if lp.bn) if plan else ()
    record(int_model, float_bytes=float32_state_bytes(model), folded_bn=folded)
    return int_model.eval()
