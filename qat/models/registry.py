"""Named model builders: the only way an export manifest refers to a model."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Any

from torch import nn

from qat.quant.provenance import record

Builder = Callable[..., nn.Module]

_BUILDERS: dict[str, Builder] = {}
# Modules whose import registers the built-in builders.
_BUILTIN_MODULES = ("qat.models.cnn", "qat.models.gpt", "qat.models.hf")


def register(name: str) -> Callable[[Builder], Builder]:
    """Register ``fn`` as the builder called ``name``; a name can be registered only once."""

    def decorator(fn: Builder) -> Builder:
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"model builder {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def model_names() -> list[str]:
    """Sorted names of all registered builders."""
    _load_builtins()
    return sorted(_BUILDERS)


def _check_json_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    try:
        round_trip = json.loads(json.dumps(kwargs, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"arguments of model {name!r} must be JSON primitives (str, int, float, bool, None, "
            f"lists and dicts of them) so the export manifest can rebuild the model: {err}"
        ) from err
    if round_trip != kwargs:
        raise ValueError(
            f"arguments of model {name!r} change when written as JSON ({kwargs!r} -> "
            f"{round_trip!r}); use lists instead of tuples and string dict keys"
        )


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; name and kwargs go into its `Provenance`."""
    _load_builtins()
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_BUILDERS))}")
    _check_json_kwargs(name, kwargs)
    model = _BUILDERS[name](**kwargs)
    record(model, builder=name, build_args=dict(kwargs))
    return model
