"""Datamodules by name, for configs and scripts."""

from __future__ import annotations

from typing import Any

from qat.data.base import BaseDataModule
from qat.data.digits import DigitsDataModule
from qat.data.gguf_tokens import ShakespeareTokensDataModule
from qat.data.hf_disk import HFDiskDataModule
from qat.data.image_folder import ImageFolderDataModule
from qat.data.sentences import SentencesDataModule
from qat.data.shakespeare import ShakespeareDataModule
from qat.data.text_files import TextFilesDataModule

DATAMODULES: dict[str, type[BaseDataModule]] = {
    "digits": DigitsDataModule,
    "shakespeare": ShakespeareDataModule,
    "shakespeare_tokens": ShakespeareTokensDataModule,
    "sentences": SentencesDataModule,
    "text_files": TextFilesDataModule,
    "hf_disk": HFDiskDataModule,
    "image_folder": ImageFolderDataModule,
}


def datamodule_names() -> list[str]:
    """Sorted names accepted by :func:`build_datamodule`."""
    return sorted(DATAMODULES)


def build_datamodule(name: str, **kwargs: Any) -> BaseDataModule:
    """Construct the datamodule ``name`` with its options (``data_dir``, ``batch_size``, ...)."""
    if name not in DATAMODULES:
        raise ValueError(f"unknown datamodule {name!r}; known: {', '.join(datamodule_names())}")
    return DATAMODULES[name](**kwargs)
