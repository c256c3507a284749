"""The prepared-data cache: reused when intact, rebuilt with a warning when damaged."""

import json
import warnings

import pytest
import torch

from qat.data import DigitsDataModule


def prepared(tmp_path):
    dm = DigitsDataModule(data_dir=str(tmp_path))
    dm.setup()
    return dm


def cache_dir(tmp_path):
    (folder,) = (tmp_path / "digits").iterdir()
    return folder


def test_cache_is_reused_without_rebuilding(tmp_path, monkeypatch):
    first = prepared(tmp_path)
    assert sorted(p.name for p in cache_dir(tmp_path).iterdir()) == ["data", "meta.json"]
    assert [p.name for p in (tmp_path / "digits").iterdir() if p.name.startswith(".")] == []

    def fail(self):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(DigitsDataModule, "_build", fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = prepared(tmp_path)
    assert torch.equal(second.datasets["test"].tensors["x"], first.datasets["test"].tensors["x"])


def truncate_arrow(folder):
    arrow = next((folder / "data" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:1000])


def garbage_state(folder):
    (folder / "data" / "val" / "state.json").write_text("{not json")


def wrong_rows(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["num_rows"]["test"] = 1
    (folder / "meta.json").write_text(json.dumps(meta))


def missing_meta(folder):
    (folder / "meta.json").unlink()


@pytest.mark.parametrize("damage", [truncate_arrow, garbage_state, wrong_rows, missing_meta])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    first = prepared(tmp_path)
    damage(cache_dir(tmp_path))
    with pytest.warns(UserWarning, match="cached dataset .* is damaged .*rebuilding it"):
        again = prepared(tmp_path)
    for split in ("train", "val", "test"):
        for key in ("x", "y", "index"):
            assert torch.equal(
                again.datasets[split].tensors[key], first.datasets[split].tensors[key]
            )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared(tmp_path)  # the rebuilt cache is intact
