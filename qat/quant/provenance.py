"""`Provenance`: where a model came from, in one documented object the model carries.

Set step by step by the functions that know each part: `qat.models.registry.build_model` (the
builder and its arguments, so a loader can rebuild the float skeleton), `qat.prepare` (the
recipe, the plan and the layer families), `qat.convert` (the float32 size and the BatchNorms
folded into convs) and `qat.load` (all of them, from the manifest and the families it is given).
`qat.save` writes it into the manifest. Read it with `provenance(model)`; nothing else about a
model's history is stored on the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from qat.quant.recipe import Recipe

if TYPE_CHECKING:  # the plan is data; importing it here would tie this module to planning
    from qat.quant.family import Families
    from qat.quant.plan import Plan

ATTRIBUTE = "qat_provenance"


@dataclass(frozen=True)
class Provenance:
    """A model's history: how to rebuild it, how it was quantized, what export folded.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> provenance(m).builder is None
        True
        >>> record(m, builder="mlp", build_args={"width": 2})
        >>> provenance(m).builder, provenance(m).build_args
        ('mlp', {'width': 2})
    """

    builder: str | None = None  # name in qat.models.registry
    build_args: dict[str, Any] = field(default_factory=dict)  # JSON-ready builder arguments
    recipe: Recipe | None = None  # set by prepare
    plan: Plan | None = None  # set by prepare (not by load: a loaded model is not re-planned)
    float_bytes: int | None = None  # float32 state_dict bytes of the prepared model (convert)
    folded_bn: tuple[str, ...] = ()  # BatchNorms folded or merged into convs (convert)
    # The layer families the model was prepared (or loaded) with: convert and the ONNX export
    # read the integer class and ONNX builder of each layer from them.
    families: Families | None = None


def provenance(model: nn.Module) -> Provenance:
    """The model's `Provenance` (empty for a model no qat function has touched)."""
    found = model.__dict__.get(ATTRIBUTE)
    return found if isinstance(found, Provenance) else Provenance()


def record(model: nn.Module, **changes: Any) -> None:
    """Update some fields of the model's provenance (the others are kept)."""
    new = dataclasses.replace(provenance(model), **changes)
    object.__setattr__(model, ATTRIBUTE, new)  # a plain attribute, not a submodule/parameter
