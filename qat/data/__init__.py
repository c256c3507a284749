"""LightningDataModules on Hugging Face ``datasets``: built-in corpora and local user data."""

from qat.data.base import BaseDataModule, EpochShuffleSampler, TensorDictDataset
from qat.data.charlm import CharLMDataModule, TokenBlocks
from qat.data.digits import DigitsDataModule
from qat.data.gguf_tokens import GGUFTokenizer, ShakespeareTokensDataModule
from qat.data.hf_disk import HFDiskDataModule
from qat.data.image_folder import ImageFolderDataModule
from qat.data.registry import DATAMODULES, build_datamodule, datamodule_names
from qat.data.sentences import SentencesDataModule
from qat.data.shakespeare import ShakespeareDataModule
from qat.data.text_files import TextFilesDataModule
from qat.data.vocab import UNK_ID, CharVocab

__all__ = [
    "DATAMODULES",
    "UNK_ID",
    "BaseDataModule",
    "CharLMDataModule",
    "CharVocab",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "GGUFTokenizer",
    "HFDiskDataModule",
    "ImageFolderDataModule",
    "SentencesDataModule",
    "ShakespeareDataModule",
    "ShakespeareTokensDataModule",
    "TensorDictDataset",
    "TextFilesDataModule",
    "TokenBlocks",
    "build_datamodule",
    "datamodule_names",
]
