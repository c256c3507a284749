"""The chosen widths as a recipe file: the base recipe's rules, then one rule per width naming
its layers (a later rule overrides an earlier one field by field, so only `bits` changes)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from qat.io import atomic_write
from qat.quant.recipe import Recipe


def with_weight_bits(recipe: dict[str, Any], bits: int) -> dict[str, Any]:
    """`recipe` with every rule's weight spec at `bits` (what the scan measures).

    Example:
        >>> r = {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 4}}]}
        >>> with_weight_bits(r, 8)["rules"][0]["weight"]
        {'bits': 8}
    """
    out = copy.deepcopy(recipe)
    for rule in out.get("rules", []):
        if isinstance(rule.get("weight"), dict):
            rule["weight"]["bits"] = bits
    return out


def mixed_recipe(base: dict[str, Any], bits: dict[str, int], description: str) -> dict[str, Any]:
    """`base` plus one rule per width in `bits` (layer name -> width), checked as a recipe.

    Example:
        >>> r = {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 4}}]}
        >>> mixed_recipe(r, {"fc2": 8, "fc1": 3, "fc3": 3}, "mixed")["rules"][1:]
        [{'match': {'names': ['fc1', 'fc3']}, 'weight': {'bits': 3}}, \
{'match': {'names': ['fc2']}, 'weight': {'bits': 8}}]
    """
    out = copy.deepcopy(base)
    out["description"] = description
    for width in sorted(set(bits.values())):
        names = sorted(n for n, b in bits.items() if b == width)
        out.setdefault("rules", []).append({"match": {"names": names}, "weight": {"bits": width}})
    Recipe.from_dict(out)  # the written file must read back
    return out


def write_recipe(path: str | Path, recipe: dict[str, Any], header: list[str]) -> Path:
    """Write `recipe` as YAML under `header` (comment lines saying how it was made),
    atomically."""
    lines = "".join(f"# {h}\n" for h in header)
    text = lines + yaml.safe_dump(recipe, sort_keys=False, width=100)
    return atomic_write(path, lambda f: f.write(text.encode()), "recipe file")
