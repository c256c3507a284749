"""Shared LightningDataModule plumbing: splits, deterministic shuffling, loaders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler

SPLITS = ("train", "val", "test")


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from a ``torch.Generator`` seeded by ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at every epoch start, so a run resumed at epoch ``e`` sees the
    same order as one that was never interrupted.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self) -> int:
        return self.size


class TensorDictDataset(Dataset):
    """Rows of equally long tensors; item ``i`` is ``{name: tensor[i]}``."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        sizes = {name: len(t) for name, t in tensors.items()}
        if not tensors or len(set(sizes.values())) != 1:
            raise ValueError(f"TensorDictDataset needs tensors of one length, got {sizes}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: t[i] for name, t in self.tensors.items()}


class BaseDataModule(L.LightningDataModule):
    """Subclasses implement ``_load_splits`` (build or read the cache, return torch datasets)."""

    name = "base"

    def __init__(
        self,
        data_dir: str = "data_cache",
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.drop_last = drop_last
        self.datasets: dict[str, Dataset] = {}

    @property
    def cache_root(self) -> Path:
        return self.data_dir / self.name

    def _load_splits(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self._load_splits()
            for split, ds in self.datasets.items():
                if len(ds) == 0:
                    raise ValueError(f"{self.name}: the {split} split is empty; use more data")

    def make_collate(self) -> Callable[[list[Any]], Any] | None:
        """The loaders' collate function; ``None`` is torch's default (stacks dicts of tensors)."""
        return None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        ds = self.datasets[split]
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(ds), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=self.make_collate(),
            drop_last=self.drop_last and shuffle,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def fraction_check(val_fraction: float, test_fraction: float) -> None:
    """Validate hold-out fractions: each in (0, 1), together below 1."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{key} must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training data, "
            f"got {val_fraction} + {test_fraction}"
        )


def stratified_split(
    labels: np.ndarray, holdout: dict[str, float], split_seed: int
) -> dict[str, np.ndarray]:
    """Sorted row indices: each ``holdout`` split takes its fraction of every class, seeded;
    ``train`` keeps the rest."""
    rest, left, out = np.arange(len(labels)), 1.0, {}
    for split, fraction in holdout.items():
        rest, held = train_test_split(
            rest, test_size=fraction / left, stratify=labels[rest], random_state=split_seed
        )
        out[split], left = np.sort(held), left - fraction
    out["train"] = np.sort(rest)
    return out
