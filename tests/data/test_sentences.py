"""Sentences from the plays, tokenised with the MiniLM tokenizer from its local directory."""

import pytest
import torch

from qat.data import SentencesDataModule
from qat.data.plays import cut_sentences
from qat.pretrained import load_tokenizer, minilm_path


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    dm = SentencesDataModule(
        data_dir=str(tmp_path_factory.mktemp("data")),
        batch_size=16,
        max_length=24,
        max_train_sentences=600,
        max_eval_sentences=100,
    )
    dm.setup()
    return dm


def test_cut_sentences_drops_speakers_stage_directions_and_headings():
    play = (
        "HAMLET\n\nPERSONS REPRESENTED.\nClaudius, King of Denmark.\n\nACT I.\n\n"
        "Scene I. Elsinore.\n\n[Enter Bernardo.]\n\nBer.\nWho's there? Nay, answer me:\n"
        "stand, and unfold yourself.\n\nFirst Lord.\nLong live the king [Kneels] and his queen!\n"
    )
    assert cut_sentences(play, min_words=2) == [
        "Who's there?",
        "Nay, answer me: stand, and unfold yourself.",
        "Long live the king and his queen!",
    ]


def test_splits_come_from_disjoint_plays_and_share_no_sentence(sentences):
    texts = sentences.texts
    assert [len(texts[s]) for s in ("train", "val", "test")] == [600, 100, 100]
    assert not set(texts["train"]) & set(texts["val"])
    assert not (set(texts["train"]) | set(texts["val"])) & set(texts["test"])
    assert not set(sentences.plays["train"]) & set(sentences.plays["test"])
    again = SentencesDataModule(
        data_dir=str(sentences.data_dir),
        max_length=24,
        max_train_sentences=600,
        max_eval_sentences=100,
    )
    again.setup()
    assert again.texts == texts


def test_batches_match_the_tokenizer_used_directly(sentences):
    tokenizer = load_tokenizer(minilm_path())
    batch = next(iter(sentences.val_dataloader()))
    ref = tokenizer(
        sentences.texts["val"][:16],
        truncation=True,
        max_length=24,
        padding=True,
        return_tensors="pt",
    )
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape[1] <= 24
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])


def test_padding_to_max_length(tmp_path, sentences):
    dm = SentencesDataModule(
        data_dir=str(sentences.data_dir),
        batch_size=4,
        max_length=24,
        pad_to_max_length=True,
        max_train_sentences=600,
        max_eval_sentences=100,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 24)
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == 0)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        SentencesDataModule(data_dir=str(tmp_path), max_length=1)
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        SentencesDataModule(
            data_dir=str(tmp_path), tokenizer_path=str(tmp_path / "no_such_tokenizer")
        )
