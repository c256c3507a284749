"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes) as a datamodule."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from sklearn.datasets import load_digits

from qat.data.base import (
    SPLITS,
    BaseDataModule,
    TensorDictDataset,
    fraction_check,
    stratified_split,
)
from qat.data.cache import Built, fingerprint, load_or_build

_FEATURES = Features(
    {
        "index": Value("int32"),  # row in load_digits(), to check that splits are disjoint
        "pixels": List(Value("uint8"), length=64),  # raw 0..16 intensities, row-major 8x8
        "label": ClassLabel(names=[str(d) for d in range(10)]),
    }
)


class DigitsDataModule(BaseDataModule):
    """Batches ``{"x": float (B, 1, 8, 8), "y": long (B,)}``.

    Pixels are scaled to [0, 1], then standardised with the training split's mean and std.
    """

    name = "digits"
    num_classes = 10

    def __init__(
        self,
        *,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        **common: Any,  # BaseDataModule's arguments (data_dir, batch_size, ...)
    ) -> None:
        super().__init__(**common)
        fraction_check(val_fraction, test_fraction)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed = split_seed
        self.mean = self.std = 0.0

    def _build(self) -> Built:
        bunch = load_digits()
        pixels, labels = bunch.data.astype(np.uint8), bunch.target.astype(np.int64)
        holdout = {"test": self.test_fraction, "val": self.val_fraction}
        rows = stratified_split(labels, holdout, self.split_seed)
        data = DatasetDict(
            {
                split: Dataset.from_dict(
                    {"index": idx, "pixels": pixels[idx], "label": labels[idx]},
                    features=_FEATURES,
                )
                for split, idx in rows.items()
            }
        )
        train = pixels[rows["train"]] / 16.0
        return data, {"mean": float(train.mean()), "std": float(train.std())}

    def _load_splits(self) -> dict[str, TensorDictDataset]:
        options = {
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "split_seed": self.split_seed,
        }
        data, meta = load_or_build(self.cache_root / fingerprint(options), self._build)
        self.mean, self.std = meta["mean"], meta["std"]
        out = {}
        for split in SPLITS:
            cols = data[split].with_format("numpy")[:]
            x = torch.from_numpy(np.stack(cols["pixels"]).astype(np.float32) / 16.0)
            out[split] = TensorDictDataset(
                x=((x - self.mean) / self.std).reshape(-1, 1, 8, 8),  # (N, 1, 8, 8)
                y=torch.from_numpy(cols["label"].astype(np.int64)),
                index=torch.from_numpy(cols["index"].astype(np.int64)),
            )
        return out
