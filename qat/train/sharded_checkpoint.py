"""Sharded checkpoints (`trainer.strategy.sharded_checkpoints=true` under FSDP): each rank
writes its own shards, nothing is gathered, nothing is pickled.

A checkpoint is a folder `NAME.ckpt/`:

- `rank-R.pt`, one per rank: that rank's local shard of every sharded parameter and buffer of
  the state dict and of the optimizer state (`DTensor.to_local()`), the rest of both as they
  are, and the rank's RNG state; tensors and plain containers only (`weights_only` loads it);
- `meta.pt`: the rest of Lightning's checkpoint (step, loops, callbacks, LR schedule, qat's
  metadata), written by rank 0;
- `index.json`: the format, the number of ranks and the size of each file, written last.

The folder is built under a temporary name and renamed into place once complete (`io`), so a
kill at any instant leaves the previous checkpoint or the new one. FSDP2 shards dim 0 in rank
order, so the whole tensor is the ranks' shards concatenated: `consolidate` gives the
checkpoint a single process reads (evaluation, export), the optimizer state left out.
Resuming reads back each rank's own file, on as many ranks as wrote it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qat.io import atomic_write, replace_dir, writing

FORMAT = "qat-sharded-1"
INDEX = "index.json"


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def _rank_file(r: int) -> str:
    return f"rank-{r}.pt"


def _local(value: Any) -> tuple[Any, bool]:
    """A DTensor's local shard (and True), anything else unchanged."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(value, DTensor):
        return value, False
    if tuple(value.placements) != (Shard(0),):
        raise ValueError(f"sharded checkpoints hold dim-0 shards (FSDP2), not {value.placements}")
    return value.to_local().detach().cpu(), True


def _split(tree: Any, sharded: list[str], path: str = "") -> Any:
    """`tree` with every DTensor replaced by its local shard, whose paths go to `sharded`."""
    if isinstance(tree, dict):
        return {k: _split(v, sharded, f"{path}/{k}") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_split(v, sharded, f"{path}/{i}") for i, v in enumerate(tree))
    local, was = _local(tree)
    if was:
        sharded.append(path)
    return local


def save(checkpoint: dict[str, Any], path: Path, rank: int, world: int,
         share: Callable[[Any], Any], barrier: Callable[[], None]) -> None:  # fmt: skip
    """Every rank calls it with its own `checkpoint` (Lightning's, with sharded state);
    `share(obj)` returns rank 0's `obj` on every rank, `barrier()` waits for all ranks."""
    tmp = None
    if rank == 0:
        with writing(path, "sharded checkpoint"):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(share(tmp))
    sharded: list[str] = []
    mine = {"state_dict": checkpoint.pop("state_dict"),
            "optimizer_states": checkpoint.pop("optimizer_states", []),
            "qat_rng": checkpoint.pop("qat_rng", None)}  # fmt: skip
    mine = {**_split(mine, sharded), "sharded": sharded}
    atomic_write(tmp / _rank_file(rank), lambda f: torch.save(mine, f), "sharded checkpoint")
    barrier()
    if rank == 0:
        atomic_write(tmp / "meta.pt", lambda f: torch.save(checkpoint, f), "sharded checkpoint")
        files = [_rank_file(r) for r in range(world)] + ["meta.pt"]
        index = {"format": FORMAT, "world_size": world,
                 "files": {f: (tmp / f).stat().st_size for f in files}}  # fmt: skip
        text = json.dumps(index, indent=2).encode()
        atomic_write(tmp / INDEX, lambda f: f.write(text), "sharded checkpoint")
        with writing(path, "sharded checkpoint"):
            replace_dir(tmp, path)
    barrier()


def read_index(path: Path) -> dict[str, Any]:
    """The index, checked: the format, and every file it names present at its size."""
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"sharded checkpoint {path}: unreadable {INDEX}: {e}") from None
    if index.get("format") != FORMAT:
        raise ValueError(f"sharded checkpoint {path}: format {index.get('format')!r}, this "
                         f"qat reads {FORMAT!r}")  # fmt: skip
    for name, size in index["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise ValueError(f"sharded checkpoint {path}: {name} is missing or not the "
                             f"size its index says ({size} bytes): the folder is incomplete")
    return index


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_rank(path: Path, rank: int, world: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(meta, this rank's shards)` for resuming on `world` ranks, the number that wrote it."""
    index = read_index(path)
    if index["world_size"] != world:
        raise ValueError(f"sharded checkpoint {path} was written by {index['world_size']} "
                         f"ranks; resume it on as many, or consolidate it (python -m "
                         f"qat.train.sharded_checkpoint {path} OUT.ckpt)")  # fmt: skip
    return _load(path / "meta.pt"), _load(path / _rank_file(rank))


def restore(module: torch.nn.Module, optimizers: list, mine: dict[str, Any]) -> None:
    """Load this rank's shards (`read_rank`) into sharded `module` and its `optimizers`: each
    local shard becomes a DTensor laid out as the parameter it belongs to."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=False)
    sharded = set(mine["sharded"])
    current = get_model_state_dict(module, options=opts)
    state = {k: _like(current[k], v) if f"/state_dict/{k}" in sharded else v
             for k, v in mine["state_dict"].items()}  # fmt: skip
    set_model_state_dict(module, state, options=opts)
    params = dict(module.named_parameters())
    for i, (opt, saved) in enumerate(zip(optimizers, mine["optimizer_states"], strict=True)):
        per_param = {
            fqn: {k: _like(params[fqn], v) if f"/optimizer_states/{i}/state/{fqn}/{k}" in sharded
                  else v for k, v in entries.items()}
            for fqn, entries in saved["state"].items()
        }  # fmt: skip
        set_optimizer_state_dict(module, opt, {**saved, "state": per_param}, options=opts)


def _like(ref: Any, local: torch.Tensor) -> Any:
    """`local` as the shard of a DTensor laid out as `ref`."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,
                              shape=ref.shape, stride=ref.stride())  # fmt: skip


def consolidate(path: str | Path) -> dict[str, Any]:
    """The whole checkpoint as one process reads it: state dict tensors concatenated from the
    ranks' shards, Lightning's metadata, rank 0's RNG; no optimizer state."""
    path = Path(path)
    index = read_index(path)
    ranks = [_load(path / _rank_file(r)) for r in range(index["world_size"])]
    whole = dict(ranks[0]["state_dict"])
    for p in ranks[0]["sharded"]:
        parts = p.strip("/").split("/")
        if parts[0] == "state_dict":
            key = "/".join(parts[1:])
            whole[key] = torch.cat([r["state_dict"][key] for r in ranks])
    return {**_load(path / "meta.pt"), "state_dict": whole, "qat_rng": ranks[0]["qat_rng"]}


def main(argv: list[str] | None = None) -> None:
    """`python -m qat.train.sharded_checkpoint DIR OUT.ckpt`: one file from a sharded one."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    whole = consolidate(args.checkpoint)
    atomic_write(args.out, lambda f: torch.save(whole, f), "checkpoint")
    print(f"{args.out}: step {whole.get('global_step')}, {len(whole['state_dict'])} tensors")


if __name__ == "__main__":
    main()
