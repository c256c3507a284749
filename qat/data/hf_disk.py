"""A user dataset written with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_from_disk
from torch.utils.data import Dataset as TorchDataset

from qat.data.base import SPLITS, TensorDictDataset, fraction_check
from qat.data.cache import file_stamp
from qat.data.charlm import CharLMDataModule, Documents, split_text
from qat.data.vocab import CharVocab

_SPLIT_KEYS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


class HFDiskDataModule(CharLMDataModule):
    """Two modes over a dataset saved to ``path``.

    * tensor mode (default): each column (``columns``, default all) becomes a batch key, renamed by
      ``rename`` (e.g. ``{"image": "x", "label": "y"}``); missing val/test splits are a seeded
      random ``val_fraction``/``test_fraction`` of the rows. ``num_classes`` is read from ``y``.
    * text mode (``text_column`` set): a character LM over that column, like ``text_files``;
      missing splits are cut contiguously from the end of the training text.
    """

    name = "hf_disk"

    def __init__(
        self,
        path: str,
        *,
        columns: list[str] | None = None,
        rename: dict[str, str] | None = None,
        text_column: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        **common: Any,  # CharLMDataModule's arguments (block_size, ..., data_dir, ...)
    ) -> None:
        super().__init__(**common)
        fraction_check(val_fraction, test_fraction)
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(
                f"dataset path {self.path} does not exist; pass a folder written by save_to_disk"
            )
        self.columns, self.rename, self.text_column = columns, dict(rename or {}), text_column
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed = split_seed
        self._num_classes: int | None = None

    def _read_splits(self) -> dict[str, Dataset]:
        try:
            obj = load_from_disk(str(self.path))
        except Exception as err:
            raise ValueError(
                f"{self.path} is not a dataset saved with save_to_disk "
                f"({type(err).__name__}: {err})"
            ) from err
        given = dict(obj) if isinstance(obj, DatasetDict) else {"train": obj}
        splits = {_SPLIT_KEYS[k]: ds for k, ds in given.items() if k in _SPLIT_KEYS}
        if "train" not in splits:
            raise ValueError(f"{self.path} has splits {sorted(given)}; one must be 'train'")
        if splits["train"].num_rows == 0:
            raise ValueError(f"the dataset at {self.path} is empty")
        return splits

    def _cache_options(self) -> dict:
        files = sorted(p for p in self.path.rglob("*") if p.is_file())
        return {
            "files": file_stamp(files),
            "text_column": self.text_column,
            "fractions": [self.val_fraction, self.test_fraction],
        }

    def _documents(self) -> Documents:
        splits = self._read_splits()
        for ds in splits.values():
            if self.text_column not in ds.column_names:
                raise ValueError(
                    f"text_column {self.text_column!r} not in {self.path}; "
                    f"columns are {ds.column_names}"
                )
        texts = {s: "\n".join(ds[self.text_column]) for s, ds in splits.items()}
        missing = [s for s in ("val", "test") if s not in texts]
        if missing:
            pieces = split_text(
                texts["train"],
                self.val_fraction if "val" in missing else 0.0,
                self.test_fraction if "test" in missing else 0.0,
            )
            texts = {**texts, "train": pieces["train"], **{s: pieces[s] for s in missing}}
        return {split: [(split, texts[split])] for split in SPLITS}

    def _load_splits(self) -> dict[str, TorchDataset]:
        if self.text_column is not None:
            return super()._load_splits()
        splits = self._read_splits()
        missing = [s for s in ("val", "test") if s not in splits]
        if missing:
            fractions = {"val": self.val_fraction, "test": self.test_fraction}
            held = sum(fractions[s] for s in missing)
            parts = splits["train"].train_test_split(test_size=held, seed=self.split_seed)
            splits["train"] = parts["train"]
            if len(missing) == 2:
                parts = parts["test"].train_test_split(
                    test_size=self.test_fraction / held, seed=self.split_seed
                )
                splits["val"], splits["test"] = parts["train"], parts["test"]
            else:
                splits[missing[0]] = parts["test"]
        out = {split: self._tensors(splits[split], split) for split in SPLITS}
        labels = [ds.tensors["y"] for ds in out.values() if "y" in ds.tensors]
        if self._num_classes is None and labels and not labels[0].is_floating_point():
            self._num_classes = int(max(y.max() for y in labels)) + 1
        return out

    def _tensors(self, ds: Dataset, split: str) -> TensorDictDataset:
        if self.columns:
            absent = sorted(set(self.columns) - set(ds.column_names))
            if absent:
                raise ValueError(f"columns {absent} not in {self.path}; it has {ds.column_names}")
            ds = ds.select_columns(self.columns)
        ds = ds.rename_columns({k: v for k, v in self.rename.items() if k in ds.column_names})
        for name, feature in ds.features.items():
            if getattr(feature, "dtype", None) in ("string", "large_string"):
                raise ValueError(
                    f"column {name!r} of {self.path} holds text; pass text_column={name!r} for a "
                    "character LM, or leave it out of `columns`"
                )
        if isinstance(ds.features.get("y"), ClassLabel):
            self._num_classes = ds.features["y"].num_classes
        tensors = {}
        for name, values in ds.with_format("torch")[:].items():
            if not isinstance(values, torch.Tensor):
                raise ValueError(
                    f"column {name!r} of the {split} split has rows of different shapes; "
                    "pad them to one shape before save_to_disk"
                )
            tensors[name] = values.float() if values.dtype == torch.float64 else values
        return TensorDictDataset(**tensors)

    @property
    def num_classes(self) -> int | None:
        """Classes of the ``y`` column (ClassLabel size, else max label + 1); None without one."""
        self.setup()
        return self._num_classes

    @property
    def char_vocab(self) -> CharVocab:
        if self.text_column is None:
            raise AttributeError("a vocabulary exists only in text mode; set text_column")
        return super().char_vocab
