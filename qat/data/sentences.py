"""Sentences cut from the Shakespeare plays, tokenised for distilling sentence-embedding models."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import Dataset as TorchDataset

from qat.data.base import SPLITS, BaseDataModule
from qat.data.cache import Built, fingerprint, load_or_build
from qat.data.plays import cut_sentences, play_files, read_play, split_plays
from qat.pretrained import load_tokenizer, minilm_path


def pad_batch(
    items: list[dict[str, list[int]]], pad_id: int, length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad token lists to the longest item (or ``length``); returns ids and mask."""
    width = length or max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(items), width), dtype=torch.long)  # (B, L)
    for row, item in enumerate(items):
        seq = item["input_ids"][:width]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TokenLists(TorchDataset):
    def __init__(self, input_ids: list[list[int]]) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[i]}


class SentencesDataModule(BaseDataModule):
    """Batches ``{"input_ids": long (B, L), "attention_mask": long (B, L)}``.

    Sentences come from whole plays per split (the same play split as ``shakespeare``); a sentence
    already in an earlier split is dropped, and each split is capped by a seeded sample.
    """

    name = "sentences"

    def __init__(
        self,
        *,
        tokenizer_path: str | None = None,
        max_length: int = 64,
        pad_to_max_length: bool = False,
        max_train_sentences: int = 4000,
        max_eval_sentences: int = 500,
        min_words: int = 4,
        max_words: int = 40,
        val_plays: int = 3,
        test_plays: int = 3,
        split_seed: int = 0,
        **common: Any,  # BaseDataModule's arguments (data_dir, batch_size, ...)
    ) -> None:
        super().__init__(**common)
        if max_length < 2:
            raise ValueError(
                f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}"
            )
        if min(max_train_sentences, max_eval_sentences) < 1 or not 1 <= min_words <= max_words:
            raise ValueError(
                "need max_train_sentences, max_eval_sentences >= 1 and 1 <= min_words <= max_words"
            )
        if tokenizer_path is not None and not Path(tokenizer_path).expanduser().is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {tokenizer_path} does not exist; pass a local model folder"
            )
        self.tokenizer_path = tokenizer_path
        self.max_length, self.pad_to_max_length = max_length, pad_to_max_length
        self.caps = {"train": max_train_sentences, "val": max_eval_sentences}
        self.caps["test"] = max_eval_sentences
        self.min_words, self.max_words, self.split_seed = min_words, max_words, split_seed
        self.plays = split_plays(list(play_files()), val_plays, test_plays, split_seed)
        self.texts: dict[str, list[str]] = {}
        self.tokenizer: Any = None

    def _build(self) -> Built:
        files = play_files()
        seen: set[str] = set()
        splits = {}
        for split in SPLITS:
            rows: dict[str, str] = {}  # sentence -> play, first occurrence
            for play in self.plays[split]:
                text = read_play(files[play])
                for sentence in cut_sentences(text, self.min_words, self.max_words):
                    if sentence not in seen:
                        rows.setdefault(sentence, play)
            seen.update(rows)
            items = list(rows.items())
            rng = random.Random(self.split_seed)
            keep = sorted(rng.sample(range(len(items)), min(len(items), self.caps[split])))
            splits[split] = Dataset.from_dict(
                {"text": [items[i][0] for i in keep], "play": [items[i][1] for i in keep]}
            )
        return DatasetDict(splits), {"plays": self.plays}

    def _load_splits(self) -> dict[str, TorchDataset]:
        options = {
            "plays": self.plays,
            "caps": self.caps,
            "words": [self.min_words, self.max_words],
            "split_seed": self.split_seed,
        }
        data, _ = load_or_build(self.cache_root / fingerprint(options), self._build)
        path = Path(self.tokenizer_path).expanduser() if self.tokenizer_path else minilm_path()
        self.tokenizer = load_tokenizer(path)
        out = {}
        for split in SPLITS:
            self.texts[split] = list(data[split]["text"])
            enc = self.tokenizer(self.texts[split], truncation=True, max_length=self.max_length)
            out[split] = TokenLists(enc["input_ids"])
        return out

    def make_collate(self) -> Any:
        length = self.max_length if self.pad_to_max_length else None
        return partial(pad_batch, pad_id=self.tokenizer.pad_token_id or 0, length=length)
