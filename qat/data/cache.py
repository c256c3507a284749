"""Prepared datasets cached with ``save_to_disk``; written atomically, rebuilt when damaged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import DatasetDict, load_from_disk
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

CACHE_VERSION = 1
Built = tuple[DatasetDict, dict[str, Any]]


def fingerprint(options: dict[str, Any]) -> str:
    """A short stable hash of JSON-able build options, used as the cache folder name."""
    text = json.dumps({"cache_version": CACHE_VERSION, **options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_stamp(paths: list[Path]) -> list[list[Any]]:
    """(path, size, mtime) of each file, so edited user files invalidate their cache."""
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def _load(cache_dir: Path) -> Built:
    meta = json.loads((cache_dir / "meta.json").read_text())
    if meta.get("cache_version") != CACHE_VERSION:
        raise ValueError(f"cache version {meta.get('cache_version')} != {CACHE_VERSION}")
    data = load_from_disk(str(cache_dir / "data"))
    if not isinstance(data, DatasetDict):
        raise ValueError("cached data is not a DatasetDict")
    rows = {split: ds.num_rows for split, ds in data.items()}
    if rows != meta.get("num_rows"):
        raise ValueError(f"rows {rows} do not match the manifest {meta.get('num_rows')}")
    for ds in data.values():
        ds.data.table.validate(full=True)
    return data, meta


def _save(cache_dir: Path, data: DatasetDict, meta: dict[str, Any]) -> None:
    tmp = cache_dir.with_name(f".{cache_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # small datasets: a bar per split is only noise
    try:
        data.save_to_disk(str(tmp / "data"))
    finally:
        if not quiet:
            enable_progress_bars()
    meta = {**meta, "cache_version": CACHE_VERSION}
    meta["num_rows"] = {split: ds.num_rows for split, ds in data.items()}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, cache_dir)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_build(cache_dir: Path, build: Callable[[], Built]) -> Built:
    """Load ``cache_dir`` (``data/`` + ``meta.json``); if missing or damaged, ``build`` and save."""
    if cache_dir.exists():
        try:
            return _load(cache_dir)
        except Exception as err:
            warnings.warn(
                f"cached dataset {cache_dir} is damaged ({type(err).__name__}: {err}); "
                "rebuilding it",
                stacklevel=2,
            )
            shutil.rmtree(cache_dir, ignore_errors=True)
    data, meta = build()
    _save(cache_dir, data, meta)
    return _load(cache_dir)
