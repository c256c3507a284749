"""Tokenizer metadata of a GGUF file: a character vocabulary (qat's GPT), or every
`tokenizer.*` field carried over from a GGUF file (a pretrained model's own: its BPE tokens,
merges, special token ids and chat template, exactly as its source file had them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

UNK = 0  # the character vocabulary's unknown token, which no text produces


def add_char_vocab(w: Any, gguf: Any, vocab: list[str] | None, size: int) -> None:
    """A character vocabulary; id 0 is the unknown token and also the start/end token ids (so
    llama.cpp never takes a character for end-of-text); no start token or space is prepended.

    Characters of one byte each (ASCII text) are written for llama.cpp's greedy literal matcher
    (`rwkv`), which turns a byte outside the vocabulary into the unknown token. Otherwise the
    tokens are SentencePiece-style (a space is '▁'), whose byte fallback needs `<0xXX>` tokens
    a character vocabulary has not: llama.cpp then aborts on text with an unseen character.
    """
    if vocab is None:
        vocab = ["<unk>"] + [chr(i) if 32 <= i < 127 else f"<0x{i:02X}>" for i in range(1, size)]
    if len(vocab) != size:
        raise ValueError(
            f"vocabulary has {len(vocab)} entries but the model's vocab_size is {size}"
        )
    if all(len(t.encode()) == 1 for t in vocab[1:]):
        w.add_tokenizer_model("rwkv")
        tokens = ["<unk>"] + [t.replace("\\", "\\\\") for t in vocab[1:]]  # rwkv's escape
    else:
        w.add_tokenizer_model("llama")
        tokens = ["<unk>"] + [t.replace(" ", "\u2581") for t in vocab[1:]]
        w.add_add_space_prefix(False)
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * size)
    w.add_token_types([gguf.TokenType.UNKNOWN] + [gguf.TokenType.NORMAL] * (size - 1))
    w.add_unk_token_id(UNK)
    w.add_bos_token_id(UNK)
    w.add_eos_token_id(UNK)
    w.add_add_bos_token(False)


def copy_tokenizer(w: Any, gguf: Any, source: str | Path, size: int) -> None:
    """Every `tokenizer.*` field of GGUF file `source`, with its value types."""
    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{source}: no tokenizer.ggml.tokens: not a GGUF file with a tokenizer")
    if len(tokens.data) != size:
        raise ValueError(f"{source}: its tokenizer has {len(tokens.data)} tokens but the "
                         f"model's vocab_size is {size}: give the GGUF the model came from")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub_type=sub)
