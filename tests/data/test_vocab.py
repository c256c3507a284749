"""CharVocab: round trips, the reserved unknown id, saving."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qat.data.vocab import UNK_ID, CharVocab


def test_ids_follow_sorted_characters_after_the_unknown_id():
    vocab = CharVocab.from_texts(["hello", "world\n"])
    assert vocab.chars == sorted(set("helloworld\n"))
    assert vocab.itos[UNK_ID] == "\ufffd" and vocab.size == len(vocab.chars) + 1
    assert vocab.encode("he") == [vocab.chars.index("h") + 1, vocab.chars.index("e") + 1]


@given(st.text(max_size=200))
def test_decode_inverts_encode_for_training_text(text):
    vocab = CharVocab.from_texts([text])
    ids = vocab.encode_array(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert vocab.decode(ids) == text


@given(st.text(alphabet="abc", max_size=50), st.text(alphabet="xyz", min_size=1, max_size=20))
def test_unseen_characters_map_to_the_reserved_id(train, unseen):
    vocab = CharVocab.from_texts([train])
    assert vocab.encode(unseen) == [UNK_ID] * len(unseen)
    assert vocab.decode(vocab.encode(unseen)) == "\ufffd" * len(unseen)


def test_save_and_load_round_trip(tmp_path):
    vocab = CharVocab(["z", "a", "\n", "é"])  # order given, not sorted
    vocab.save(tmp_path / "vocab.json")
    loaded = CharVocab.load(tmp_path / "vocab.json")
    assert loaded.itos == vocab.itos
    assert loaded.encode("aé\nz?") == vocab.encode("aé\nz?") == [2, 4, 3, 1, UNK_ID]
    assert loaded.decode(torch.tensor([1, 2])) == "za"


def test_bad_vocabularies_and_ids_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="distinct single characters"):
        CharVocab(["a", "a"])
    with pytest.raises(ValueError, match="distinct single characters"):
        CharVocab(["ab"])
    with pytest.raises(ValueError, match="out of range"):
        CharVocab(["a"]).decode([2])
    with pytest.raises(ValueError, match="out of range"):
        CharVocab(["a"]).decode([-1])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CharVocab.load(tmp_path / "missing.json")
