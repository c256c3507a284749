"""`plan()`: resolve a recipe against a model (module -> rules -> specs) without changing it."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from qat.quant.bn_fold import BN_TYPES
from qat.quant.family import Families
from qat.quant.modules import QATMixin
from qat.quant.observers import MSE_CANDIDATES, MSE_MAX_SAMPLES
from qat.quant.recipe import Recipe, _name_matches, as_recipe
from qat.quant.spec import ROLES, QuantSpec, check_integer_layout, check_keys_apply


@dataclass
class LayerPlan:
    """What the recipe decided for one quantizable module."""

    name: str
    type: str
    rules: list[int] = field(default_factory=list)
    ignored: bool = False
    specs: dict[str, QuantSpec | None] = field(default_factory=dict)
    bn: str | None = None  # the BatchNorm folded or merged into this conv

    @property
    def quantized(self) -> bool:
        return any(s is not None for s in self.specs.values())


@dataclass
class Plan:
    """The dry-run result: `print(plan)` shows a table; `plan.layers` holds the rows."""

    recipe: Recipe
    layers: list[LayerPlan]
    bn_pairs: dict[str, str] = field(default_factory=dict)  # conv name -> bn name
    # Modules holding a matrix or kernel that no fake-quant class covers: they stay float.
    unquantizable: dict[str, str] = field(default_factory=dict)  # name -> type
    lora_targets: list[str] = field(default_factory=list)  # layers that get LoRA adapters

    def quantized(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.quantized]

    def weight_specs(self) -> dict[str, QuantSpec]:
        """Layer -> its weight's spec, for the layers whose weights are quantized."""
        return {lp.name: lp.specs["weight"] for lp in self.quantized() if lp.specs.get("weight")}

    def notes(self) -> list[str]:
        """What this plan will cost that a user should know before calibration starts."""
        mse = [
            (lp.name, spec)
            for lp in self.layers
            for role in ("input", "output")
            if (spec := lp.specs.get(role)) is not None
            and spec.observer == "mse"
            and not spec.dynamic
        ]
        out = [self.float_note()] if self.unquantizable else []
        if not mse:
            return out
        static = sum(1 for _, spec in mse if spec.learn == "none")
        during = f"; {static} of them static, so also every training step until " \
            "schedule.freeze_observers" if static else ""
        return out + [
            f"cost: {len(mse)} activation quantizers use the mse observer, ~{MSE_CANDIDATES}x "
            f"the work of ema/minmax per calibration batch ({MSE_CANDIDATES} grids on up to "
            f"{MSE_MAX_SAMPLES:,} values each){during}; on a language model prefer ema"
        ]

    def float_note(self) -> str:
        """One line naming the modules whose weights no fake-quant class covers."""
        by_type: dict[str, list[str]] = {}
        for name, kind in self.unquantizable.items():
            by_type.setdefault(kind, []).append(name)
        parts = [f"{kind} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
                 for kind, names in by_type.items()]  # fmt: skip
        return (f"not quantizable, stays float: {len(self.unquantizable)} module(s) of type "
                + "; ".join(parts))

    def summary(self) -> str:
        """One line per distinct setting: how many modules got it (a long plan, short)."""
        counts: dict[str, int] = {}
        for lp in self.layers:
            if lp.ignored or not lp.quantized:
                key = "float" + (" (ignored)" if lp.ignored else "")
            else:
                parts = [f"{r} {s.describe()}" for r in ROLES if (s := lp.specs.get(r))]
                key = ", ".join(parts)
            counts[key] = counts.get(key, 0) + 1
        head = f"plan: {len(self.quantized())} of {len(self.layers)} quantizable modules quantized"
        if self.bn_pairs:
            head += f" ({len(self.bn_pairs)} BatchNorm {self.recipe.bn})"
        rows = [f"  {n:>4} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]
        if self.lora_targets:
            lo = self.recipe.lora
            rows.append(f"lora: r {lo.r}, alpha {lo.lora_alpha:g} on {len(self.lora_targets)} "
                        "layers; every other weight is frozen")  # fmt: skip
        return "\n".join([head, *rows, *self.notes()])

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"qat plan (bn: {self.recipe.bn})", show_lines=False)
        for col in ("module", "type", "rules", "weight", "input", "output", "bn"):
            table.add_column(col)
        for lp in self.layers:
            rules = "ignored" if lp.ignored else ",".join(str(i) for i in lp.rules) or "-"
            cells = [lp.specs.get(r).describe() if lp.specs.get(r) else "float" for r in ROLES]
            if not lp.quantized:
                cells = ["float", "-", "-"]
            table.add_row(lp.name, lp.type, rules, *cells, lp.bn or "")
        buf = io.StringIO()
        Console(file=buf, width=160, color_system=None).print(table)
        n = len(self.quantized())
        notes = "".join(f"{line}\n" for line in self.notes())
        return buf.getvalue() + f"{n} of {len(self.layers)} quantizable modules quantized\n" + notes


def find_unquantizable(model: nn.Module, families: Families) -> dict[str, str]:
    """Modules that hold a matrix or kernel (a parameter of 2+ dims, directly) but that no
    fake-quant class covers, name -> type: what a plan must show stays float.

    Example:
        >>> from qat.quant.family import LayerFamily
        >>> from qat.quant.modules import QATLinear
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.Bilinear(4, 4, 4), nn.LayerNorm(4))
        >>> find_unquantizable(m, Families([LayerFamily(QATLinear)]))
        {'1': 'Bilinear'}
    """
    out: dict[str, str] = {}
    covered: list[str] = []  # named_modules lists a parent before its parts
    for name, mod in model.named_modules():
        if families.qat_class_for(mod) is not None:
            covered.append(name)
        elif any(p.ndim >= 2 for p in mod.parameters(recurse=False)) and not any(
                name.startswith(f"{c}.") for c in covered):  # a covered module's own part
            out[name] = type(mod).__name__
    return out


def find_conv_bn_pairs(model: nn.Module, families: Families) -> dict[str, str]:
    """Conv -> BatchNorm pairs (convs of families with a fused Conv-BN class) where the BN
    consumes only that conv's output.

    Found from a `torch.fx` trace; a model that cannot be traced falls back to adjacent
    (Conv, BN) children of `nn.Sequential` containers, with a warning.
    """
    mods = dict(model.named_modules())
    if not any(isinstance(m, BN_TYPES) for m in mods.values()):
        return {}
    convs = tuple(f.float_type for f in families if f.conv_bn_type is not None)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - any trace failure means "use the fallback"
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); "
            "Conv-BN pairs are taken from adjacent layers in nn.Sequential containers only",
            stacklevel=3,
        )
        pairs = {}
        for prefix, mod in mods.items():
            if isinstance(mod, nn.Sequential):
                kids = list(mod.named_children())
                for (a, ma), (b, mb) in zip(kids, kids[1:], strict=False):
                    if isinstance(ma, convs) and isinstance(mb, BN_TYPES):
                        pre = f"{prefix}." if prefix else ""
                        pairs[pre + a] = pre + b
        return pairs
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), BN_TYPES):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), convs)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs[src.target] = node.target
    return pairs


def _resolve(rules_hit, role: str, name: str, mod: nn.Module, qat_cls) -> QuantSpec | None:
    merged: dict | None = None
    contributors: list[int] = []
    for rule in rules_hit:
        if role not in rule.specs:
            continue
        if rule.specs[role] is None:
            merged, contributors = None, []
            continue
        merged = {**(merged or {}), **rule.specs[role]}
        contributors.append(rule.index)
    if merged is None:
        return None
    path = "+".join(f"rules[{i}]" for i in contributors) + f".{role}"
    try:
        spec = QuantSpec.from_dict(merged, path=path).check_role(role)
        check_keys_apply(merged, path)
        if role == "weight":
            for shape in qat_cls.weight_shapes(mod):
                spec.check_shape(shape)
        else:
            spec.check_width(qat_cls.activation_widths(mod)[role])
    except ValueError as e:
        raise ValueError(f"{e} (module {name!r}, {type(mod).__name__})") from None
    return spec


def plan(
    model: nn.Module, recipe: Recipe | dict | str, families: Families, verbose: bool = False
) -> Plan:
    """Dry run: every quantizable module (one `families` covers) with the rules that decided
    it and its specs (`qat.plan` passes the shipped families).

    Raises `ValueError` when a rule matches no quantizable module (unless `optional: true`) or
    a resolved spec is impossible for its module. Nothing in `model` changes.
    """
    recipe = as_recipe(recipe)
    quantizable = [(n, m) for n, m in model.named_modules()
                   if n and families.qat_class_for(m) is not None]  # fmt: skip
    unquantizable = find_unquantizable(model, families)
    hits: dict[str, list] = {n: [] for n, _ in quantizable}
    for rule in recipe.rules:
        matched = [n for n, m in quantizable if rule.matches(n, m)]
        if rule.position == "first":
            matched = matched[:1]
        elif rule.position == "last":
            matched = matched[-1:]
        if not matched and not rule.optional:
            names = ", ".join(n for n, _ in quantizable[:12]) + (
                " ..." if len(quantizable) > 12 else ""
            )
            floats = [n for n in unquantizable if rule.matches(n, model.get_submodule(n))]
            also = (f"; it matches {len(floats)} module(s) no fake-quant class covers "
                    f"({', '.join(floats[:3])}: {type(model.get_submodule(floats[0])).__name__})"
                    if floats else "")  # fmt: skip
            raise ValueError(
                f"rules[{rule.index}].match: matches no quantizable module "
                f"(names={rule.names}, types={rule.types}){also}; "
                f"quantizable modules: {names or 'none'}. "
                "Fix the match or add `optional: true` to the rule."
            )
        for n in matched:
            hits[n].append(rule)
    for pattern in recipe.ignore:
        if not any(_name_matches(pattern, n) for n, _ in quantizable):
            warnings.warn(f"ignore entry {pattern!r} matches no quantizable module", stacklevel=2)
    pairs = find_conv_bn_pairs(model, families) if recipe.bn != "keep" else {}
    layers = []
    for name, mod in quantizable:
        lp = LayerPlan(name, type(mod).__name__, rules=[r.index for r in hits[name]])
        lp.ignored = any(_name_matches(p, name) for p in recipe.ignore)
        qat_cls = families.qat_class_for(mod)
        shapes = qat_cls.weight_shapes(mod)
        for role in ROLES:
            skip = lp.ignored or (role == "input" and isinstance(mod, nn.Embedding))
            lp.specs[role] = None if skip else _resolve(hits[name], role, name, mod, qat_cls)
        try:
            check_integer_layout(lp.specs["weight"], lp.specs["input"], len(shapes[0]),
                                 qat_cls.INTEGER_INPUTS, type(mod).__name__,
                                 qat_cls.OUTPUT_AXIS)  # fmt: skip
        except ValueError as e:
            raise ValueError(f"{e} (module {name!r})") from None
        if lp.quantized and name in pairs:
            lp.bn = pairs[name]
        layers.append(lp)
    result = Plan(recipe, layers, {lp.name: lp.bn for lp in layers if lp.bn}, unquantizable,
                  _lora_targets(model, recipe, layers, families))  # fmt: skip
    if verbose:
        print(result)
    return result


def _lora_targets(model: nn.Module, recipe: Recipe, layers: list[LayerPlan],
                  families: Families) -> list[str]:  # fmt: skip
    """The quantized layers `recipe.lora` names (peft's matching); errors for targets that
    cannot hold an adapter merged before a weight quantizer."""
    spec = recipe.lora
    if spec is None:
        return []
    quantized = [lp.name for lp in layers if lp.quantized]
    names = spec.targets(quantized)
    stray = [n for n in spec.targets([n for n, _ in model.named_modules() if n])
             if n not in names]  # fmt: skip
    if stray:
        raise ValueError(f"lora.target_modules matches {', '.join(stray[:3])}, which the recipe "
                         "does not quantize; add a rule for it or list it in exclude_modules")
    if not names:
        raise ValueError(f"lora.target_modules {spec.target_modules!r} matches none of the "
                         f"{len(quantized)} quantized modules ({', '.join(quantized[:4])} ...)")
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        if isinstance(m._parameters.get("weight"), torch.Tensor):
            owners.setdefault(id(m.weight), []).append(n)
    for n in names:
        mod = model.get_submodule(n)
        if not issubclass(families.qat_class_for(mod), QATMixin):
            raise ValueError(f"lora: {n} ({type(mod).__name__}) cannot take adapters; target "
                             "its Linear parts or list it in exclude_modules")  # fmt: skip
        tied = [o for o in owners.get(id(mod.weight), []) if o != n]
        if tied:
            raise ValueError(f"lora: {n} shares its weight with {', '.join(tied)}; one merged "
                             "update cannot serve both; list it in exclude_modules")
    return names
