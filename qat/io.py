"""The one atomic file write: a temp file in the same folder, fsync, rename, fsync the folder.

A reader (or a resumed run) sees the old file or the whole new one, never a torn one, even
if the process is killed mid-write. Writing in the same folder keeps the rename atomic
(a temp file in `$TMPDIR` may sit on another file system, where a "move" is a copy).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


class WriteError(OSError):
    """A file could not be written; nothing partial was left behind. One line: the file, the
    cause and what to do."""

    def __init__(self, path: Path, err: OSError, what: str = "file", then: str = "") -> None:
        reason = os.strerror(err.errno) if err.errno else str(err)
        super().__init__(
            err.errno,
            f"could not write {what} {path}: {reason}. Nothing partial was left behind; free "
            f"disk space or point paths.log_dir / hydra.run.dir at a writable location{then}",
        )
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder (which makes a rename inside it durable), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, what: str = "file", error: type[WriteError] = WriteError
) -> Iterator[Path]:
    """A temp path beside `path` to write to (for writers that open files themselves); on
    success it is fsynced and renamed over `path`, on failure removed. An `OSError` (full
    disk, read-only folder) becomes `error` (a `WriteError`) naming `path`.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_path(p) as tmp:
        ...     _ = tmp.write_text("ok")
        >>> p.read_text(), [q.name for q in p.parent.iterdir()]
        ('ok', ['x.txt'])
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets open()'s mode
        os.close(fd)
    except OSError as e:
        raise error(path, e, what) from None
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise error(path, e, what) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], Any],
    what: str = "file",
    error: type[WriteError] = WriteError,
) -> Path:
    """Call `write(f)` on a temp file beside `path`, then rename it over `path` (see
    `atomic_path`).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> atomic_write(p, lambda f: f.write(b"ok")).read_bytes()
        b'ok'
    """
    with atomic_path(path, what, error) as tmp, tmp.open("wb") as f:
        write(f)
    return Path(path)


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished folder `tmp` over `target` (a folder, or nothing yet), durably. An
    existing `target` moves aside first and is removed after: a crash in between leaves the
    old folder beside a complete new one, never a half-written `target`."""
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder gets mkdir()'s mode
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_path(target.parent)


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """An `OSError` inside the block becomes `WriteError` naming `path` (for writes that are
    atomic by other means, e.g. a temp directory renamed into place)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(Path(path), e, what) from None


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """`data` as indented JSON, written atomically."""
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    return atomic_write(path, lambda f: f.write(text), "JSON file")
