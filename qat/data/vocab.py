"""Character vocabulary with a reserved unknown id."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

UNK_ID = 0


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class CharVocab:
    """Id 0 is reserved for characters not seen in training; ids 1.. are ``chars`` in order."""

    def __init__(self, chars: Sequence[str], unk: str = "\ufffd") -> None:
        chars = list(chars)
        bad = [c for c in chars if len(c) != 1]
        if bad or len(set(chars)) != len(chars) or unk in chars:
            raise ValueError(
                f"vocabulary must be distinct single characters without the unknown marker "
                f"{unk!r}; bad entries: {bad[:5]}"
            )
        self.chars, self.unk = chars, unk
        self.itos = [unk, *chars]
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(codes, kind="stable")
        self._sorted_codes = codes[order]
        self._sorted_ids = (order + 1).astype(np.int32)

    @classmethod
    def from_texts(cls, texts: Iterable[str], unk: str = "\ufffd") -> CharVocab:
        """All characters of ``texts`` (minus ``unk``), sorted by code point."""
        codes: set[int] = set()
        for text in texts:
            codes.update(np.unique(_codepoints(text)).tolist())
        codes.discard(ord(unk))
        return cls([chr(c) for c in sorted(codes)], unk=unk)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def size(self) -> int:
        """Number of ids, including the unknown id."""
        return len(self.itos)

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of ``text`` as int32 (vectorised; unknown characters -> ``UNK_ID``)."""
        codes = _codepoints(text)
        if not len(self._sorted_codes):
            return np.zeros(len(codes), dtype=np.int32)
        pos = np.searchsorted(self._sorted_codes, codes).clip(max=len(self._sorted_codes) - 1)
        hit = self._sorted_codes[pos] == codes
        return np.where(hit, self._sorted_ids[pos], UNK_ID).astype(np.int32)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; unknown characters map to ``UNK_ID``."""
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        """Text of ``ids``; the unknown id decodes to the ``unk`` marker."""
        ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
        bad = [i for i in ids if not 0 <= i < len(self.itos)]
        if bad:
            raise ValueError(f"ids {bad[:5]} out of range for a vocabulary of {self.size}")
        return "".join(self.itos[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"unk_id": UNK_ID, "unk": self.unk, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharVocab:
        if data.get("unk_id", UNK_ID) != UNK_ID or "chars" not in data:
            raise ValueError(f"not a CharVocab dict (needs 'chars' and unk_id {UNK_ID})")
        return cls(data["chars"], unk=data.get("unk", "\ufffd"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> CharVocab:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"vocabulary file {p} does not exist")
        return cls.from_dict(json.loads(p.read_text()))
