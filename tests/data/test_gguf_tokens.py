"""Shakespeare as SmolLM2 tokens (its GGUF's tokenizer, through llama.cpp): the same play-wise
splits as the character module, each split exactly its plays' token ids, shifted targets."""

import pytest
import torch

from qat.data import GGUFTokenizer, ShakespeareDataModule, ShakespeareTokensDataModule
from qat.data.plays import play_files, read_play
from qat.pretrained import smollm2_gguf

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    dm = ShakespeareTokensDataModule(data_dir=str(tmp_path_factory.mktemp("data")),
                                     batch_size=4, block_size=64)  # fmt: skip
    dm.setup()
    return dm


def test_splits_are_the_plays_of_the_character_module_as_tokenizer_ids(tokens, tmp_path):
    chars = ShakespeareDataModule(data_dir=str(tmp_path), batch_size=4, block_size=64)
    assert tokens.plays == chars.plays and tokens.vocab_size == 49152
    tok, files = GGUFTokenizer(smollm2_gguf()), play_files()
    try:
        for split in ("val", "test"):
            text = [read_play(files[p]) + "\n\n" for p in tokens.plays[split]]
            want = [i for t in text for i in tok.encode(t)]
            assert torch.equal(tokens.datasets[split].ids.long(), torch.tensor(want))
    finally:
        tok.close()
    batch = next(iter(tokens.train_dataloader()))
    assert batch["x"].shape == (4, 64) and torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    assert tokens.decode(tokens.datasets["train"].ids[:12]).startswith("ANTONY AND CLEOPATRA")


def test_token_data_has_no_character_vocabulary(tokens):
    with pytest.raises(AttributeError, match="tokenizer is the GGUF file"):
        _ = tokens.vocab
    with pytest.raises(FileNotFoundError, match="data.tokenizer: GGUF file /nope.gguf"):
        ShakespeareTokensDataModule(data_dir="/tmp", batch_size=1, tokenizer="/nope.gguf")
