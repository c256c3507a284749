"""The chosen widths as a recipe file: the base recipe's rules, then one rule per width naming
its layers (a later rule overrides an earlier one field by field, so only `bits`, and with
candidate group sizes `group_size`, change)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from qat.io import atomic_write
from qat.quant.recipe import Recipe
from qat.sensitivity.width import Width


def at_width(recipe: dict[str, Any], width: Width, grouped: set[str]) -> dict[str, Any]:
    """`recipe` with every rule's weight spec at `width.bits` and, when the width has a group
    size, the per-group layers `grouped` at that size (what the scan measures).

    Example:
        >>> r = {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 4}}]}
        >>> at_width(r, Width(8), set())["rules"]
        [{'match': {'types': ['Linear']}, 'weight': {'bits': 8}}]
        >>> at_width(r, Width(2, 64), {"fc1"})["rules"][1]
        {'match': {'names': ['fc1']}, 'weight': {'group_size': 64}}
    """
    out = copy.deepcopy(recipe)
    for rule in out.get("rules", []):
        if isinstance(rule.get("weight"), dict):
            rule["weight"]["bits"] = width.bits
    if width.group_size and grouped:  # a later rule overrides an earlier one field by field
        out["rules"].append({"match": {"names": sorted(grouped)},
                             "weight": {"group_size": width.group_size}})  # fmt: skip
    return out


def mixed_recipe(base: dict[str, Any], widths: dict[str, Width], grouped: set[str],
                 description: str) -> dict[str, Any]:  # fmt: skip
    """`base` plus one rule per format in `widths` (layer name -> width; the per-group layers
    `grouped` also take its group size), checked as a recipe.

    Example:
        >>> r = {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 4}}]}
        >>> mixed_recipe(r, {"fc2": Width(8), "fc1": Width(3), "fc3": Width(3)}, set(),
        ...              "mixed")["rules"][1:]
        [{'match': {'names': ['fc1', 'fc3']}, 'weight': {'bits': 3}}, \
{'match': {'names': ['fc2']}, 'weight': {'bits': 8}}]
        >>> g = {"rules": [{"match": {"types": ["Linear"]}, "weight": {"bits": 4,
        ...      "granularity": "per_group", "group_size": 32}}]}
        >>> [rule["weight"] for rule in mixed_recipe(g, {"fc1": Width(3, 64), "fc2": Width(3, 64)},
        ...                                          {"fc1"}, "mixed")["rules"][1:]]
        [{'bits': 3}, {'bits': 3, 'group_size': 64}]
    """
    out = copy.deepcopy(base)
    out["description"] = description
    rules: dict[tuple[tuple[str, int], ...], list[str]] = {}
    for name, width in widths.items():
        fields = width.weight(name in grouped)
        rules.setdefault(tuple(sorted(fields.items())), []).append(name)
    for fields, names in sorted(rules.items()):
        out.setdefault("rules", []).append({"match": {"names": sorted(names)},
                                            "weight": dict(fields)})  # fmt: skip
    Recipe.from_dict(out)  # the written file must read back
    return out


def write_recipe(path: str | Path, recipe: dict[str, Any], header: list[str]) -> Path:
    """Write `recipe` as YAML under `header` (comment lines saying how it was made),
    atomically."""
    lines = "".join(f"# {h}\n" for h in header)
    text = lines + yaml.safe_dump(recipe, sort_keys=False, width=100)
    return atomic_write(path, lambda f: f.write(text.encode()), "recipe file")
