"""Character-level language modelling: token ids stored per document, items sliced as windows."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value
from torch.utils.data import Dataset as TorchDataset

from qat.data.base import SPLITS, BaseDataModule
from qat.data.cache import Built, fingerprint, load_or_build
from qat.data.vocab import CharVocab

Documents = dict[str, list[tuple[str, str]]]  # split -> [(document name, text)]
# One row per document: its name and token ids (character or tokenizer ids).
DOC_FEATURES = Features({"doc": Value("string"), "ids": List(Value("int32"))})


class TokenBlocks(TorchDataset):
    """Windows of one long id array: item ``i`` is ``x = ids[s:s+T]``, ``y = ids[s+1:s+T+1]``.

    Window starts are ``0, stride, 2*stride, ...``; ``max_blocks`` keeps that many evenly spaced
    starts so a capped split still covers the whole text.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        block_size: int,
        stride: int | None = None,
        max_blocks: int | None = None,
    ) -> None:
        if ids.numel() < block_size + 1:
            raise ValueError(
                f"a split has {ids.numel()} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "lower block_size or add text"
            )
        self.ids, self.block_size = ids, block_size
        starts = torch.arange(0, ids.numel() - block_size, stride or block_size)
        if max_blocks is not None and len(starts) > max_blocks:
            starts = starts[torch.linspace(0, len(starts) - 1, max_blocks).round().long()]
        self.starts = starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[i])
        window = self.ids[s : s + self.block_size + 1].long()  # (T + 1,)
        return {"x": window[:-1], "y": window[1:]}


def split_text(text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Contiguous train | val | test pieces of ``text``, cut at line breaks where one is near."""

    def cut(pos: int) -> int:
        nl = text.find("\n", pos, pos + 1000)
        return pos if nl < 0 else nl + 1

    a = cut(round(len(text) * (1 - val_fraction - test_fraction)))
    b = max(a, cut(round(len(text) * (1 - test_fraction))))
    return {"train": text[:a], "val": text[a:b], "test": text[b:]}


def build_charlm_data(docs: Documents, separator: str) -> Built:
    """Vocabulary from the train split; ids of every document followed by ``separator``."""
    for split in SPLITS:
        if not any(text.strip() for _, text in docs.get(split, [])):
            raise ValueError(f"the {split} split has no text; check the input files or fractions")
    vocab = CharVocab.from_texts([text for _, text in docs["train"]] + [separator])
    data = DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "doc": [name for name, _ in docs[split]],
                    "ids": [vocab.encode_array(text + separator) for _, text in docs[split]],
                },
                features=DOC_FEATURES,
            )
            for split in SPLITS
        }
    )
    names = {split: [name for name, _ in docs[split]] for split in SPLITS}
    return data, {"vocab": vocab.to_dict(), "docs": names}


def flat_ids(ds: Dataset) -> torch.Tensor:
    """All ids of a split, documents concatenated, as one int32 tensor."""
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in ds.data.column("ids").chunks]
    return torch.from_numpy(np.concatenate(chunks).astype(np.int32, copy=False))


class CharLMDataModule(BaseDataModule):
    """Batches ``{"x": long (B, T), "y": long (B, T)}`` with ``y`` = ``x`` shifted by one.

    Subclasses give the documents of each split (``_documents``) and the options that determine
    them (``_cache_options``). ``vocab_size`` counts the reserved unknown id.
    """

    separator = "\n\n"

    def __init__(
        self,
        *,
        block_size: int = 128,
        stride: int | None = None,
        max_train_blocks: int | None = None,
        max_eval_blocks: int | None = None,
        **common: Any,  # BaseDataModule's arguments (data_dir, batch_size, ...)
    ) -> None:
        super().__init__(**common)
        for key, value in (
            ("block_size", block_size),
            ("stride", stride),
            ("max_train_blocks", max_train_blocks),
            ("max_eval_blocks", max_eval_blocks),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 (or None where allowed), got {value}")
        self.block_size, self.stride = block_size, stride
        self.max_train_blocks, self.max_eval_blocks = max_train_blocks, max_eval_blocks
        self._vocab: CharVocab | None = None
        self.doc_names: dict[str, list[str]] = {}

    def _documents(self) -> Documents:
        raise NotImplementedError

    def _cache_options(self) -> dict:
        raise NotImplementedError

    def _build(self) -> Built:
        """The cache's contents: ids per document and split, and the metadata to read back."""
        return build_charlm_data(self._documents(), self.separator)

    def _read_meta(self, meta: dict) -> None:
        self._vocab = CharVocab.from_dict(meta["vocab"])
        self.doc_names = meta["docs"]

    def _load_splits(self) -> dict[str, TorchDataset]:
        cache_dir = self.cache_root / fingerprint(self._cache_options())
        data, meta = load_or_build(cache_dir, self._build)
        self._read_meta(meta)
        caps = {"train": self.max_train_blocks}
        return {
            split: TokenBlocks(
                flat_ids(data[split]),
                self.block_size,
                self.stride,
                caps.get(split, self.max_eval_blocks),
            )
            for split in SPLITS
        }

    @property
    def char_vocab(self) -> CharVocab:
        """The vocabulary of the training split (prepares the data on first use)."""
        self.setup()
        assert self._vocab is not None
        return self._vocab

    @property
    def vocab(self) -> list[str]:
        """Id -> character; id 0 is the unknown marker."""
        return self.char_vocab.itos

    @property
    def vocab_size(self) -> int:
        return self.char_vocab.size

    def encode(self, text: str) -> list[int]:
        return self.char_vocab.encode(text)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self.char_vocab.decode(ids)
