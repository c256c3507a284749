"""Digits: a fixed stratified split, normalisation against sklearn's own arrays, loaders."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from qat.data import DigitsDataModule, build_datamodule


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    dm = DigitsDataModule(data_dir=str(tmp_path_factory.mktemp("data")), batch_size=32)
    dm.setup()
    return dm


def indices(dm, split):
    return dm.datasets[split].tensors["index"].numpy()


def test_splits_partition_all_images_and_are_stratified(digits):
    sizes = {s: len(digits.datasets[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    everything = np.concatenate([indices(digits, s) for s in sizes])
    assert sorted(everything) == list(range(1797))  # disjoint and complete
    labels = load_digits().target
    for split, size in sizes.items():
        counts = np.bincount(digits.datasets[split].tensors["y"].numpy(), minlength=10)
        expected = np.bincount(labels, minlength=10) * size / 1797
        assert np.all(np.abs(counts - expected) <= 2.0), split  # two rounded cuts


def test_split_is_deterministic_and_follows_split_seed(digits, tmp_path):
    again = DigitsDataModule(data_dir=str(tmp_path / "a"))
    again.setup()
    other = DigitsDataModule(data_dir=str(tmp_path / "b"), split_seed=1)
    other.setup()
    assert np.array_equal(indices(again, "test"), indices(digits, "test"))
    assert not np.array_equal(indices(other, "test"), indices(digits, "test"))


def test_images_are_sklearn_pixels_standardised_with_train_statistics(digits):
    bunch = load_digits()
    train = digits.datasets["train"].tensors
    raw = bunch.images[train["index"].numpy()] / 16.0
    mean, std = raw.mean(), raw.std()
    expected = torch.from_numpy((raw - mean) / std).float().unsqueeze(1)
    torch.testing.assert_close(train["x"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(train["y"], torch.from_numpy(bunch.target[train["index"].numpy()]))
    assert abs(train["x"].mean().item()) < 1e-5 and abs(train["x"].std().item() - 1) < 1e-3


def test_batches_are_dicts_of_tensors(digits):
    batch = next(iter(digits.train_dataloader()))
    assert batch["x"].shape == (32, 1, 8, 8) and batch["x"].dtype == torch.float32
    assert batch["y"].shape == (32,) and batch["y"].dtype == torch.long
    assert digits.num_classes == 10


def test_shuffling_depends_only_on_seed_and_epoch(digits, tmp_path):
    def order(dm, epoch=0):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([b["index"] for b in loader]).tolist()

    same = DigitsDataModule(data_dir=str(tmp_path), batch_size=32)
    reseeded = DigitsDataModule(data_dir=str(tmp_path), batch_size=32, seed=1)
    assert order(same) == order(digits)
    assert order(reseeded) != order(digits)
    assert order(digits, 1) != order(digits, 0) and order(digits, 1) == order(same, 1)
    assert sorted(order(digits)) == sorted(indices(digits, "train").tolist())
    evaluation = [torch.cat([b["index"] for b in digits.val_dataloader()]) for _ in range(2)]
    assert evaluation[0].tolist() == evaluation[1].tolist() == indices(digits, "val").tolist()


def test_registry_builds_datamodules_and_rejects_bad_options(tmp_path):
    dm = build_datamodule("digits", data_dir=str(tmp_path), batch_size=8)
    assert isinstance(dm, DigitsDataModule) and dm.batch_size == 8
    with pytest.raises(ValueError, match="unknown datamodule 'mnist'; known: digits"):
        build_datamodule("mnist")
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        DigitsDataModule(data_dir=str(tmp_path), val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DigitsDataModule(data_dir=str(tmp_path), batch_size=0)
