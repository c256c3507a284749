"""A model's repeated blocks (a transformer's layers), so sequential GPTQ can run one block on
cached inputs instead of the whole model once per stage.

A plan is used only when one batch proves the model is a chain of its blocks: every block is
called once, block i+1's first input is block i's output, and all other inputs (masks, rotary
tables) are the ones block 0 got. Otherwise there is no plan and the runner falls back to
whole-model passes, which are always right, only slower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Call = tuple[tuple, dict]  # one block call: positional and keyword inputs


class _Seen(Exception):
    """Raised once block 0's inputs are captured: the rest of the forward is not needed."""


@dataclass
class BlockPlan:
    """Stages before the blocks, each block's stages, and stages after (the head)."""

    blocks: list[nn.Module]
    before: list[list[str]]
    inside: list[list[list[str]]]
    after: list[list[str]]


def _repeated(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList whose children hold the most of `names` (at least two)."""
    best, most = None, 1
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            n = sum(name.startswith(prefix + ".") for name in names)
            if n > most:
                best, most = (prefix, mod), n
    return best


def _block_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1 :].split(".")[0])


def _split(stages: list[list[str]], prefix: str, n: int) -> tuple | None:
    """Stages as (before, per block, after), or None if a stage spans blocks or the order
    is not before, block 0, ..., block n-1, after."""
    before, inside, after = [], [[] for _ in range(n)], []
    last = -1
    for stage in stages:
        owners = {_block_of(name, prefix) for name in stage}
        if len(owners) != 1:
            return None
        (i,) = owners
        if i is None:
            (before if last < 0 else after).append(stage)
        elif i < last or after:
            return None
        else:
            inside[i].append(stage)
            last = i
    return before, inside, after


def hidden(out: Any) -> Any:
    """A block's output hidden state (blocks may return a tuple with it first)."""
    return out[0] if isinstance(out, tuple | list) else out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and (a is b or (a.shape == b.shape and torch.equal(a, b))))  # fmt: skip
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and a == b)


def _chained(blocks: nn.ModuleList, run: Callable[[], Any]) -> bool:
    """Whether one forward (`run`) calls the blocks as a chain (see the module docstring)."""
    calls: list[tuple[int, Call, Any]] = []
    handles = [
        b.register_forward_hook(
            lambda m, a, k, o, i=i: calls.append((i, (a, k), o)), with_kwargs=True
        )  # fmt: skip
        for i, b in enumerate(blocks)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if [i for i, _, _ in calls] != list(range(len(blocks))) or not calls[0][1][0]:
        return False
    (args0, kw0) = calls[0][1]
    for (_, _, out), (_, (args, kw), _) in zip(calls, calls[1:], strict=False):
        if not args or not _same(args[0], hidden(out)):
            return False
        if not (_same(args[1:], args0[1:]) and _same(kw, kw0)):
            return False
    return True


def block_plan(
    model: nn.Module, stages: list[list[str]], run: Callable[[], Any]
) -> BlockPlan | None:
    """The plan for `model` whose layers are called in `stages`, checked on one forward
    `run()`; None when the model is not a chain of repeated blocks."""
    found = _repeated(model, [n for s in stages for n in s])
    if found is None:
        return None
    prefix, blocks = found
    split = _split(stages, prefix, len(blocks))
    if split is None or not _chained(blocks, run):
        return None
    return BlockPlan(list(blocks), *split)


def first_inputs(block: nn.Module, runs: list[Callable[[], Any]]) -> list[Call] | None:
    """Block's inputs for each forward in `runs` (each stopped once the block is reached)."""
    calls: list[Call] = []

    def hook(mod, args, kwargs):
        calls.append((args, kwargs))
        raise _Seen

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for run in runs:
            try:
                run()
            except _Seen:
                pass
    finally:
        handle.remove()
    return calls if len(calls) == len(runs) else None
