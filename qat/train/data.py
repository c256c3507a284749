"""A resumable training stream: batch `k` of a run depends only on (seed, k)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


class StreamSampler(Sampler[int]):
    """Endless indices: epoch `e` is a permutation seeded by `(seed, e)`, concatenated.

    `start` (set from the checkpoint's global step when a run resumes) skips the indices that
    earlier steps consumed, so an interrupted run sees exactly the batches of an
    uninterrupted one. Under DDP, rank `r` of `w` takes every `w`-th index of the stream
    (set `use_distributed_sampler: false` on the Trainer).
    """

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("the training split is empty")
        self.size, self.seed, self.start = size, seed, 0

    def _perm(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        # Under DDP each rank takes every world-th index of the one global stream.
        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        epoch, offset = divmod(self.start * world, self.size)
        pos = 0
        while True:
            for i in self._perm(epoch)[offset:]:
                if pos % world == rank:
                    yield i
                pos += 1
            epoch, offset = epoch + 1, 0


def stream_loader(datamodule, seed: int) -> DataLoader:
    """The training loader over `datamodule`'s train split as an endless resumable stream."""
    datamodule.setup()
    ds = datamodule.datasets["train"]
    return DataLoader(
        ds,
        batch_size=datamodule.batch_size,
        sampler=StreamSampler(len(ds), seed),
        num_workers=datamodule.num_workers,
        collate_fn=datamodule.make_collate(),
        generator=torch.Generator().manual_seed(seed),
    )


def set_stream_position(loader: DataLoader, step: int, accumulate: int = 1) -> None:
    """Make `loader`'s next iterator start at optimizer step `step` (per-rank samples)."""
    sampler = loader.sampler
    if isinstance(sampler, StreamSampler):
        sampler.start = step * accumulate * loader.batch_size
