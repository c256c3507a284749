"""A character-level LM over the user's local text files (``load_dataset("text", ...)``)."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from datasets import load_dataset

from qat.data.base import fraction_check
from qat.data.cache import file_stamp
from qat.data.charlm import CharLMDataModule, Documents, split_text

_SPLIT_KEYS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
Files = str | list[str] | dict[str, str | list[str]]


def expand_files(patterns: str | list[str]) -> list[Path]:
    """Paths matching each path or glob pattern; a pattern matching nothing is an error."""
    paths: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        pattern = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(pattern, recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise FileNotFoundError(
                f"text file {pattern!r} does not exist (or the pattern matches no files); "
                "pass existing paths or glob patterns in data_files"
            )
        paths.extend(files)
    return paths


class TextFilesDataModule(CharLMDataModule):
    """Char-LM batches ``{"x", "y"}`` from local text files.

    ``data_files`` is a path, a glob, a list of them, or a dict ``{"train": ..., "validation":
    ..., "test": ...}``. Splits that are not given are cut contiguously from the end of the
    training text (``val_fraction``, ``test_fraction``), so no window crosses two splits.
    """

    name = "text_files"

    def __init__(
        self,
        data_files: Files,
        *,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        **common: Any,  # CharLMDataModule's arguments (block_size, ..., data_dir, ...)
    ) -> None:
        super().__init__(**common)
        fraction_check(val_fraction, test_fraction)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        given = data_files if isinstance(data_files, dict) else {"train": data_files}
        unknown = sorted(set(given) - set(_SPLIT_KEYS))
        if unknown or "train" not in given:
            raise ValueError(
                f"data_files keys must include 'train' and may add 'validation' and 'test'; "
                f"got {sorted(given)}"
            )
        self.files = {_SPLIT_KEYS[key]: expand_files(value) for key, value in given.items()}

    def _cache_options(self) -> dict:
        stamps = {split: file_stamp(paths) for split, paths in self.files.items()}
        return {"files": stamps, "fractions": [self.val_fraction, self.test_fraction]}

    def _read(self, paths: list[Path]) -> list[tuple[str, str]]:
        ds = load_dataset(
            "text",
            data_files=[str(p) for p in paths],
            sample_by="document",
            split="train",
            cache_dir=str(self.data_dir / "hf_datasets"),
        )
        texts = [t for t in ds["text"] if t.strip()]
        if not texts:
            raise ValueError(f"the text files {[str(p) for p in paths]} contain no text")
        return [(f"document {i}", text) for i, text in enumerate(texts)]

    def _documents(self) -> Documents:
        docs = {split: self._read(paths) for split, paths in self.files.items()}
        missing = [split for split in ("val", "test") if split not in docs]
        if missing:
            pieces = split_text(
                self.separator.join(text for _, text in docs["train"]),
                self.val_fraction if "val" in missing else 0.0,
                self.test_fraction if "test" in missing else 0.0,
            )
            docs["train"] = [("train", pieces["train"])]
            for split in missing:
                docs[split] = [(split, pieces[split])]
        return docs
