"""A local folder of class subfolders (``path/<class>/<image>``) through ``imagefolder``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value, load_dataset

from qat.data.base import (
    SPLITS,
    BaseDataModule,
    TensorDictDataset,
    fraction_check,
    stratified_split,
)
from qat.data.cache import Built, file_stamp, fingerprint, load_or_build

_SPLIT_KEYS = {"train": "train", "validation": "val", "test": "test"}


class ImageFolderDataModule(BaseDataModule):
    """Batches ``{"x": float (B, C, S, S), "y": long (B,)}``, ``C`` = 1 if ``grayscale`` else 3.

    Subfolders ``train/``, ``val/`` (or ``validation/``), ``test/`` are used as splits when
    present; otherwise a seeded stratified split of all images. Images are resized to
    ``image_size``, scaled to [0, 1] and standardised per channel with the training statistics.
    """

    name = "image_folder"

    def __init__(
        self,
        path: str,
        *,
        image_size: int = 8,
        grayscale: bool = True,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        **common: Any,  # BaseDataModule's arguments (data_dir, batch_size, ...)
    ) -> None:
        super().__init__(**common)
        fraction_check(val_fraction, test_fraction)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"image folder {self.path} does not exist; expected {self.path}/<class>/<image>"
            )
        self.image_size, self.grayscale = image_size, grayscale
        self.channels = 1 if grayscale else 3
        self.val_fraction, self.test_fraction, self.split_seed = (
            val_fraction,
            test_fraction,
            split_seed,
        )
        self.class_names: list[str] = []

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.class_names)

    def _pixels(self, ds: Dataset) -> np.ndarray:
        from PIL import Image  # Pillow is needed only for image folders

        size, mode = (self.image_size, self.image_size), "L" if self.grayscale else "RGB"
        images = [np.asarray(row["image"].convert(mode).resize(size, Image.BILINEAR)) for row in ds]
        pixels = np.stack(images).reshape(len(images), *size, self.channels)  # (N, S, S, C)
        return pixels.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (N, C*S*S)

    def _build(self) -> Built:
        try:
            found = load_dataset(
                "imagefolder", data_dir=str(self.path), cache_dir=str(self.data_dir / "hf_datasets")
            )
        except Exception as err:
            raise ValueError(f"no images could be read from {self.path}: {err}") from err
        first = next(iter(found.values()))
        if first.num_rows == 0 or not isinstance(first.features.get("label"), ClassLabel):
            raise ValueError(
                f"no labelled images under {self.path}; expected {self.path}/<class>/<image>"
            )
        names = first.features["label"].names
        parts = {
            _SPLIT_KEYS[k]: (self._pixels(ds), np.asarray(ds["label"])) for k, ds in found.items()
        }
        if "train" not in parts:
            raise ValueError(f"{self.path} has split folders {sorted(found)} but no train/")
        holdout = {
            s: f
            for s, f in (("test", self.test_fraction), ("val", self.val_fraction))
            if s not in parts
        }
        if holdout:
            pixels, labels = parts["train"]
            try:
                rows = stratified_split(labels, holdout, self.split_seed)
            except ValueError as err:
                raise ValueError(
                    f"too few images per class in {self.path} to split: {err}"
                ) from err
            parts.update({s: (pixels[idx], labels[idx]) for s, idx in rows.items()})
        features = Features({"pixels": List(Value("uint8")), "label": ClassLabel(names=names)})
        data = DatasetDict(
            {
                s: Dataset.from_dict({"pixels": px, "label": y}, features=features)
                for s, (px, y) in parts.items()
            }
        )
        train = parts["train"][0].reshape(-1, self.channels, self.image_size**2) / 255.0
        meta = {
            "class_names": names,
            "mean": train.mean(axis=(0, 2)).tolist(),
            "std": np.maximum(train.std(axis=(0, 2)), 1e-6).tolist(),
        }
        return data, meta

    def _load_splits(self) -> dict[str, TensorDictDataset]:
        files = sorted(p for p in self.path.rglob("*") if p.is_file())
        options = {
            "files": file_stamp(files),
            "image_size": self.image_size,
            "grayscale": self.grayscale,
            "split_seed": self.split_seed,
            "fractions": [self.val_fraction, self.test_fraction],
        }
        data, meta = load_or_build(self.cache_root / fingerprint(options), self._build)
        self.class_names = meta["class_names"]
        mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
        out = {}
        for split in SPLITS:
            cols = data[split].with_format("numpy")[:]
            x = torch.from_numpy(np.stack(cols["pixels"]).astype(np.float32) / 255.0)
            x = x.view(-1, self.channels, self.image_size, self.image_size)  # (N, C, S, S)
            y = torch.from_numpy(cols["label"].astype(np.int64))
            out[split] = TensorDictDataset(x=(x - mean) / std, y=y)
        return out
