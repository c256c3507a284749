"""FSDP for QAT: torch's FSDP2 (`fully_shard`) under Lightning, on CPUs (gloo) or GPUs.

Lightning's `FSDPStrategy` (FSDP1) refuses any accelerator but CUDA ("The strategy `fsdp`
requires a GPU accelerator"); its `ModelParallelStrategy` runs FSDP2 on a device mesh of any
device type, gloo included. `FSDP2Strategy` is that strategy for plain data parallelism: every
process of every node holds one shard of each block.

What is sharded: each block of the model's repeated `ModuleList`s (a transformer's layers), then
the rest as one unit, parameters along dim 0 across ranks: weights, LoRA adapters and learned
quantizer scales alike, and the optimizer state with them. Observer ranges are buffers, whole on
every rank, and reduced across ranks in every observed forward (`observers`), as under DDP.

Checkpoints are whole files, gathered on rank 0 and written atomically like every other qat
checkpoint, which resume under FSDP on any number of processes or without it; or, with
`trainer.strategy.sharded_checkpoints=true`, folders of one file per rank that nothing gathers
(`sharded_checkpoint`), which resume on as many ranks and consolidate into a whole file. Not
torch's distributed checkpoint format: it stores its metadata as a pickle, and qat loads
nothing by unpickling.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from qat.train import sharded_checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as pure FSDP2: a 1-D data-parallel mesh over all
    processes. Checkpoints are whole files, or with `sharded_checkpoints=True` one file per rank
    that nothing gathers (`sharded_checkpoint`); see the module docstring.

    Example (what `trainer=fsdp_cpu` instantiates):
        >>> FSDP2Strategy(process_group_backend="gloo").process_group_backend
        'gloo'
    """

    def __init__(self, process_group_backend: str | None = None,
                 sharded_checkpoints: bool = False, **kw: Any) -> None:  # fmt: skip
        super().__init__(save_distributed_checkpoint=sharded_checkpoints,
                         process_group_backend=process_group_backend, **kw)  # fmt: skip

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:  # fmt: skip
        if not self._save_distributed_checkpoint:  # whole: gathered, written by rank 0
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        sharded_checkpoint.save(checkpoint, path, self.global_rank, self.world_size,
                                self.broadcast, self.barrier)  # fmt: skip

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not sharded_checkpoint.is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        meta, mine = sharded_checkpoint.read_rank(path, self.global_rank, self.world_size)
        sharded_checkpoint.restore(self.model, self.optimizers, mine)
        return {**meta, "qat_rng": mine["qat_rng"]}


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The children of every `ModuleList` of two or more modules of one type (not inside
    another such list): the units gathered one at a time."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for mod in model.modules():
        if id(mod) in inside or not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if len({type(m) for m in mod}) == 1:
            found.extend(mod)
            inside.update(id(m) for block in mod for m in block.modules())
    return found


def shard(model: nn.Module, mesh: Any) -> None:
    """`fully_shard` each block of `model` (see `_blocks`), then `model` itself, on the 1-D
    `mesh`; a model sharded already is left as it is."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def unsharded(model: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module:
    """`model` itself, or when FSDP sharded it a new model from `rebuild()` (the same build,
    prepared alike) holding its whole state, on every rank: evaluation, export and the next
    stage run it whole. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    whole = rebuild()
    whole.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    return whole
