"""Atomic file writes: readers see the old file or the whole new one, never a part, and a crash leaves at most a
hidden temporary beside it. Standard library only, so every layer (checkpoints, corpora, id caches) shares it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from charlstm.core.errors import storage_error, write_failure

TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's /proc), since setting
    it to read it back is a race with any other thread creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, 'w')`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(fh)`` atomically.

    ``write`` fills a temporary file in the same folder (``.NAME.XXXX.tmp``), which is flushed to disk, given the
    mode the user's umask asks for (``mkstemp`` creates 0600), renamed over ``path`` (atomic on POSIX and
    Windows), and the rename is made durable by syncing the folder. On any failure the temporary is removed
    and the old file, if any, is untouched; a full disk or a folder that cannot be written is a
    :class:`~charlstm.core.errors.StorageError` saying so.
    """
    path = Path(path)
    try:
        _atomic_write(path, write)
    except Exception as err:
        failed = write_failure(err)
        if failed is None:
            raise
        kept = f"the previous {path.name} is kept unchanged" if path.is_file() else f"no {path.name} was written"
        raise storage_error(failed, path, kept) from err


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
