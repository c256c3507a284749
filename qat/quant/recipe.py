"""`Recipe`: declarative rules (YAML) that say which layers get which `QuantSpec`s."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from qat.quant.lora import LoraSpec
from qat.quant.spec import ROLES, QuantSpec, check_field, check_role_fields

BN_MODES = ("fold", "merge", "keep")
SCHEDULE_KEYS = ("calibrate", "freeze_observers", "freeze_bn")
RECIPE_KEYS = ("rules", "ignore", "bn", "schedule", "init", "lora", "description")
# Where the weights start from: round-to-nearest codes of the float weights, or GPTQ's.
INIT_MODES = ("rtn", "gptq")
RULE_KEYS = ("match", "weight", "input", "output", "optional")
MATCH_KEYS = ("names", "types", "position")


def _fail(path: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{path}: got {value!r}; allowed: {allowed}")


def _mapping(value: Any, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, value, "a mapping with keys " + ", ".join(keys))
    for k in value:
        if k not in keys:
            raise _fail(f"{path}.{k}" if isinstance(k, str) else path, k, ", ".join(keys))
    return value


def _str_list(value: Any, path: str, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _fail(path, value, f"a list of {what}")
    for i, v in enumerate(value):
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise _fail(f"{path}[{i}]", v, f"a valid regular expression ({e})") from None
    return list(value)


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _type_matches(type_name: str, mod: nn.Module) -> bool:
    for cls in type(mod).__mro__:
        if type_name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            return True
    return False


@dataclass(frozen=True)
class Rule:
    """One `rules[i]` entry: a match and partial specs per role (None turns a role off)."""

    index: int
    names: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    position: str | None = None
    specs: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    optional: bool = False

    @classmethod
    def parse(cls, raw: Any, i: int) -> Rule:
        p = f"rules[{i}]"
        _mapping(raw, p, RULE_KEYS)
        match = _mapping(raw.get("match"), f"{p}.match", MATCH_KEYS)
        if not match:
            raise _fail(f"{p}.match", match, "at least one of names, types")
        names = _str_list(match.get("names", []), f"{p}.match.names", "globs or 're:' regexes")
        types = _str_list(match.get("types", []), f"{p}.match.types", "class names")
        for j, t in enumerate(types):
            if "." not in t and not isinstance(getattr(nn, t, None), type):
                raise _fail(
                    f"{p}.match.types[{j}]",
                    t,
                    "a torch.nn class name (Linear, Conv1d, Conv2d, ConvTranspose2d, Embedding) "
                    "or a dotted class path (transformers.pytorch_utils.Conv1D)",
                )
        position = match.get("position")
        if position not in (None, "first", "last"):
            raise _fail(f"{p}.match.position", position, "first, last")
        specs: dict[str, dict[str, Any] | None] = {}
        for role in ROLES:
            if role in raw:
                spec = raw[role]
                if spec is not None:
                    spec = dict(_mapping(spec, f"{p}.{role}", tuple(QuantSpec.field_names())))
                    for k, v in spec.items():
                        check_field(k, v, f"{p}.{role}")
                    check_role_fields(role, spec, f"{p}.{role}")
                specs[role] = spec
        optional = raw.get("optional", False)
        if not isinstance(optional, bool):
            raise _fail(f"{p}.optional", optional, "true or false")
        if not specs:
            raise _fail(p, raw, "a rule that sets at least one of weight, input, output (null "
                        "turns a role off); a rule with only a match changes nothing")
        return cls(i, names, types, position, specs, optional)

    def matches(self, name: str, mod: nn.Module) -> bool:
        if self.names and not any(_name_matches(p, name) for p in self.names):
            return False
        return not self.types or any(_type_matches(t, mod) for t in self.types)


def _schedule_value(value: Any, path: str) -> int | float | None:
    ok = value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    )
    if not ok or (isinstance(value, float) and value >= 1 and not value.is_integer()):
        raise _fail(path, value, "a step count >= 0, a fraction of the run in (0, 1), or null")
    return int(value) if isinstance(value, float) and value >= 1 else value


@dataclass(frozen=True)
class Schedule:
    """When quantization switches flip.

    `calibrate`: batches observed before training starts (observers on, fake quant off, no
    weight updates; this is also all that PTQ does). `freeze_observers`, `freeze_bn`:
    optimizer steps, or fractions of the run when below 1; null means never.
    """

    calibrate: int = 0
    freeze_observers: int | float | None = None
    freeze_bn: int | float | None = None

    def steps(self, total_steps: int | None) -> dict[str, int | None]:
        """Resolve fractions against `total_steps`; `None` means never."""
        out: dict[str, int | None] = {"calibrate": self.calibrate}
        for k in SCHEDULE_KEYS[1:]:
            v = getattr(self, k)
            if isinstance(v, float) and v < 1:
                if total_steps is None:
                    raise ValueError(f"schedule.{k}={v} is a fraction: the run length is needed")
                v = int(round(v * total_steps))
            out[k] = v
        return out


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build with `from_yaml`, `from_dict` (or a Hydra `DictConfig`).

    Example:
        >>> r = Recipe.from_dict({"rules": [{"match": {"types": ["Linear"]},
        ...                                  "weight": {"bits": 4}}]})
        >>> r.bn, len(r.rules)
        ('fold', 1)
    """

    rules: tuple[Rule, ...] = ()
    ignore: tuple[str, ...] = ()
    bn: str = "fold"
    schedule: Schedule = Schedule()
    description: str = ""
    init: str = "rtn"
    lora: LoraSpec | None = None  # train low-rank adapters on a frozen model (`qat.quant.lora`)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Any) -> Recipe:
        d = _plain(d)  # a Hydra DictConfig is a Mapping: read as plain data, no import needed
        if d is None:
            d = {}
        _mapping(d, "recipe", RECIPE_KEYS)
        rules_raw = d.get("rules", []) or []
        if not isinstance(rules_raw, list):
            raise _fail("rules", rules_raw, "a list of rules")
        rules = tuple(Rule.parse(r, i) for i, r in enumerate(rules_raw))
        ignore = _str_list(d.get("ignore", []) or [], "ignore", "module names (globs/regexes)")
        bn = d.get("bn", "fold")
        if bn not in BN_MODES:
            raise _fail("bn", bn, ", ".join(BN_MODES))
        sched = _mapping(d.get("schedule", {}) or {}, "schedule", SCHEDULE_KEYS)
        schedule = Schedule(**{k: _schedule_value(v, f"schedule.{k}") for k, v in sched.items()})
        if not isinstance(schedule.calibrate, int):
            raise _fail("schedule.calibrate", schedule.calibrate, "a number of batches >= 0")
        desc = d.get("description", "")
        if not isinstance(desc, str):
            raise _fail("description", desc, "a string")
        init = d.get("init", "rtn")
        if init not in INIT_MODES:
            raise _fail("init", init, ", ".join(INIT_MODES))
        lora = None if d.get("lora") is None else LoraSpec.parse(d["lora"])
        return cls(rules, tuple(ignore), bn, schedule, desc, init, lora, raw=d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"recipe file {yaml_error(path, e)}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)

    def is_float(self) -> bool:
        return not any(s is not None for r in self.rules for s in r.specs.values())


def yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """`FILE:LINE:COLUMN: invalid YAML: PROBLEM` for a YAML error."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    return f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}"


def _plain(d: Any) -> Any:
    """A deep copy as plain dicts and lists (any Mapping / non-string Sequence, so OmegaConf
    containers too, with interpolations resolved on access)."""
    if isinstance(d, Mapping):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, Sequence) and not isinstance(d, (str, bytes)):
        return [_plain(v) for v in d]
    return d


def as_recipe(recipe: Recipe | dict | str | Path) -> Recipe:
    """Accept a `Recipe`, a mapping / DictConfig, or a YAML path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return Recipe.from_yaml(recipe)
    return Recipe.from_dict(recipe)
