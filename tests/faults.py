"""Run a script as a user does, on a disk that fails where it writes: ``python tests/faults.py [--readonly FOLDER]...
[--full GLOB]... SCRIPT ARGS...``.

A real read-only folder cannot be made here: tests run as root, which chmod does not stop, and mounting a read-only
file system or a full tmpfs needs privileges CI lacks. So the failures are simulated at the system calls Python
writes through, with the errors the kernel gives: under a ``--readonly`` folder every write, create, rename or
removal fails with EROFS; a file whose absolute path matches a ``--full`` glob fails its first write with ENOSPC
(torch.save, Hydra, logging and the prepared cache all write through these calls).
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import runpy
import sys
from typing import Any

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Disk:
    def __init__(self, readonly: list[str], full: list[str]) -> None:
        self.readonly = [os.path.abspath(p) for p in readonly]
        self.full = full

    def check_write(self, path: Any) -> None:
        if isinstance(path, int):
            return
        p = os.path.abspath(os.fsdecode(path))
        if any(p == r or p.startswith(r + os.sep) for r in self.readonly):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), p)

    def full_name(self, path: Any) -> str | None:
        """The file's absolute path if it lies on the full disk (``path`` may be an open descriptor)."""
        if isinstance(path, int):
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return None
        p = os.path.abspath(os.fsdecode(path))
        return p if any(fnmatch.fnmatch(p, g) for g in self.full) else None


class FullFile:
    """A file on a full disk: every write fails with ENOSPC."""

    def __init__(self, fh: Any, name: str) -> None:
        self._fh, self._name = fh, name

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> FullFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()

    def __iter__(self) -> Any:
        return iter(self._fh)


def install(disk: Disk) -> None:
    real_open, real_os_open = builtins.open, os.open

    # os.fdopen (tempfile, atomic writes) opens through io.open too
    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        writing = any(c in mode for c in "wax+")
        if writing:
            disk.check_write(file)
        fh = real_open(file, mode, *args, **kwargs)
        name = disk.full_name(file) if writing else None
        return FullFile(fh, name) if name is not None else fh

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & _WRITE_FLAGS:
            disk.check_write(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded(real: Any, *which: int) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            for i in which:
                if i < len(args):
                    disk.check_write(args[i])
            return real(*args, **kwargs)

        return call

    builtins.open = io.open = open_
    os.open = os_open
    for name, which in (("mkdir", (0,)), ("rename", (0, 1)), ("replace", (0, 1)), ("link", (1,)),
                        ("unlink", (0,)), ("remove", (0,)), ("rmdir", (0,)), ("chmod", (0,))):  # fmt: skip
        setattr(os, name, guarded(getattr(os, name), *which))


def main() -> None:
    args, readonly, full = sys.argv[1:], [], []
    while args and args[0] in ("--readonly", "--full"):
        (readonly if args[0] == "--readonly" else full).append(args[1])
        args = args[2:]
    install(Disk(readonly, full))
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
    runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
