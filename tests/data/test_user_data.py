"""User data: local text files, datasets saved with save_to_disk, image folders."""

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from PIL import Image

from qat.data import HFDiskDataModule, ImageFolderDataModule, TextFilesDataModule

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


def split_texts(dm):
    dm.setup()
    return {s: dm.decode(dm.datasets[s].ids) for s in ("train", "val", "test")}


def test_text_files_split_contiguously_without_overlap(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT[:9000])
    (tmp_path / "b.txt").write_text(TEXT[9000:])
    dm = TextFilesDataModule(str(tmp_path / "*.txt"), data_dir=str(tmp_path / "c"), block_size=16)
    dm.setup()
    texts = split_texts(dm)
    assert all(t.endswith("\n\n") for t in texts.values())
    # train | val | test, each followed by the separator, rebuild the two files exactly
    assert "".join(t[:-2] for t in texts.values()) == TEXT[:9000] + "\n\n" + TEXT[9000:]
    assert len(texts["val"]) == pytest.approx(0.05 * len(TEXT), abs=100)
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (64, 16) and torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    assert dm.decode(dm.encode("fox")) == "fox" and dm.encode("%") == [0]


def test_text_files_take_given_splits(tmp_path):
    for name in ("train", "valid", "test"):
        (tmp_path / f"{name}.txt").write_text(f"{name} text: " + TEXT[:2000])
    files = {"train": str(tmp_path / "train.txt"), "validation": [str(tmp_path / "valid.txt")]}
    files["test"] = str(tmp_path / "test.txt")
    dm = TextFilesDataModule(files, data_dir=str(tmp_path), block_size=8)
    texts = split_texts(dm)
    assert texts["val"].startswith("valid text: ") and texts["test"].startswith("test text: ")
    assert texts["train"] == "train text: " + TEXT[:2000] + "\n\n"


def test_text_files_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TextFilesDataModule(str(tmp_path / "missing.txt"), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="must include 'train'"):
        TextFilesDataModule({"dev": str(tmp_path)}, data_dir=str(tmp_path))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="contain no text"):
        TextFilesDataModule(str(tmp_path / "empty.txt"), data_dir=str(tmp_path)).setup()


def test_hf_disk_tensor_columns_with_split_and_rename(tmp_path):
    rows = np.random.default_rng(0).normal(size=(100, 1, 8, 8)).astype(np.float32)
    features = Features({"image": Value("float32"), "label": ClassLabel(names=list("abc"))})
    features["image"] = Dataset.from_dict({"image": rows[:1]}).features["image"]
    ds = Dataset.from_dict({"image": rows, "label": np.arange(100) % 3}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    dm = HFDiskDataModule(
        str(tmp_path / "ds"),
        data_dir=str(tmp_path / "c"),
        batch_size=10,
        rename={"image": "x", "label": "y"},
    )
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [80, 10, 10]
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (10, 1, 8, 8) and batch["x"].dtype == torch.float32
    assert batch["y"].dtype == torch.long and dm.num_classes == 3
    seen = torch.cat([dm.datasets[s].tensors["x"] for s in ("train", "val", "test")])
    assert sorted(seen.flatten().tolist()) == sorted(rows.flatten().tolist())  # disjoint, complete


def test_hf_disk_dataset_dict_and_text_mode(tmp_path):
    lines = TEXT.splitlines()
    DatasetDict(
        {
            "train": Dataset.from_dict({"text": lines[:200]}),
            "test": Dataset.from_dict({"text": lines[200:]}),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    dm = HFDiskDataModule(
        str(tmp_path / "dd"), data_dir=str(tmp_path / "c"), text_column="text", block_size=16
    )
    texts = split_texts(dm)
    assert texts["test"] == "\n".join(lines[200:]) + "\n\n"
    assert texts["train"][:-2] + texts["val"][:-2] == "\n".join(lines[:200])
    with pytest.raises(ValueError, match="holds text; pass text_column='text'"):
        HFDiskDataModule(str(tmp_path / "dd"), data_dir=str(tmp_path / "c")).setup()
    with pytest.raises(AttributeError, match="only in text mode"):
        _ = HFDiskDataModule(str(tmp_path / "dd"), data_dir=str(tmp_path / "c")).vocab_size


def test_hf_disk_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HFDiskDataModule(str(tmp_path / "nowhere"), data_dir=str(tmp_path))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        HFDiskDataModule(str(tmp_path / "plain"), data_dir=str(tmp_path)).setup()
    empty = Dataset.from_dict({"x": [1, 2]}).filter(lambda row: False)
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is empty"):
        HFDiskDataModule(str(tmp_path / "empty"), data_dir=str(tmp_path)).setup()


def write_images(root, classes, per_class, rng):
    for label, (name, level) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(level + rng.normal(0, 10, size=(12, 10, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{label}_{i}.png")


def test_image_folder_classes_splits_and_normalisation(tmp_path):
    write_images(tmp_path / "img", {"dark": 40, "light": 210}, 20, np.random.default_rng(0))
    dm = ImageFolderDataModule(str(tmp_path / "img"), data_dir=str(tmp_path / "c"), batch_size=8)
    assert dm.num_classes == 2 and dm.class_names == ["dark", "light"]
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [28, 6, 6]
    for split in ("train", "val", "test"):
        t = dm.datasets[split].tensors
        assert torch.bincount(t["y"]).tolist() == [len(t["y"]) // 2] * 2  # stratified
        assert torch.all((t["x"].mean((1, 2, 3)) > 0) == (t["y"] == 1))  # light is brighter
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 1, 8, 8) and batch["y"].dtype == torch.long
    train_x = dm.datasets["train"].tensors["x"]
    assert abs(train_x.mean().item()) < 1e-4 and abs(train_x.std().item() - 1) < 1e-2
    rgb = ImageFolderDataModule(
        str(tmp_path / "img"), data_dir=str(tmp_path / "c"), grayscale=False, image_size=4
    )
    assert next(iter(rgb.val_dataloader()))["x"].shape == (6, 3, 4, 4)


def test_image_folder_uses_split_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    write_images(tmp_path / "img" / "train", {"a": 50, "b": 200}, 6, rng)
    write_images(tmp_path / "img" / "test", {"a": 50, "b": 200}, 2, rng)
    dm = ImageFolderDataModule(
        str(tmp_path / "img"), data_dir=str(tmp_path / "c"), val_fraction=0.25
    )
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [9, 3, 4]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_images"):
        ImageFolderDataModule(str(tmp_path / "no_images"), data_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataModule(str(tmp_path / "empty"), data_dir=str(tmp_path)).setup()
