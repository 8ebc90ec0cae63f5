"""The project's exceptions: each carries one line that names the bad thing and the fix."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class CharLSTMError(Exception):
    """A user-facing error; its message is one line printed by the entry points."""

    prefix = "error"
    exit_code = 1


class ConfigError(CharLSTMError):
    """A configuration value is out of range, of the wrong kind or unknown."""


class CorpusError(CharLSTMError):
    """The training text cannot be read or is unusable."""


class VocabError(CharLSTMError):
    """Text holds characters the vocabulary lacks."""


class CheckpointError(CharLSTMError):
    """A checkpoint file is missing, corrupt, unsafe or not a charlstm checkpoint."""


class DivergenceError(CharLSTMError):
    """Training produced a non-finite loss."""


class TrainingFailed(CharLSTMError):
    """An unexpected exception stopped training; the message says where the last good checkpoint is."""


class TrainingInterrupted(CharLSTMError):
    """Ctrl-C or SIGTERM stopped a command (training, generation, scoring); for training the message says what was
    saved and how to resume.

    The exit status is the shell's convention for a signal, 128 + its number: 130 for Ctrl-C (SIGINT),
    143 for SIGTERM, so schedulers and scripts see an unfinished run; a job that requeued itself exits with
    the status its job runner chose (``exit_code``).
    """

    prefix = "interrupted"

    def __init__(self, message: str, signum: int = signal.SIGINT, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum if exit_code is None else exit_code


class StorageError(CharLSTMError):
    """A file or folder cannot be written: the disk is full, the file system read-only, or permission denied."""


# why a write failed, as users are told
WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def write_failure(err: BaseException | None) -> OSError | None:
    """The OSError saying a write failed for want of space or permission: ``err`` itself or one it was raised
    from or while handling (torch.save reports a failed write as a RuntimeError raised while handling it)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in WRITE_FAILURES:
            return err
        err = err.__cause__ or err.__context__
    return None


def storage_error(err: OSError, path: str | os.PathLike[str] | None = None, kept: str = "") -> StorageError:
    """One line for a failed write: which file, why, what was kept, and the fix."""
    path = path or err.filename or "a file"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there and run again"
    else:
        folder = os.path.dirname(os.path.abspath(path))
        fix = f"make {folder} writable, or write elsewhere (hydra.run.dir=..., paths.data_dir=...)"
    kept = f"; {kept}" if kept else ""
    return StorageError(f"cannot write {path}: {WRITE_FAILURES[err.errno]}{kept}; {fix}")


class JobFailed(CharLSTMError):
    """A job a launcher started (on SLURM, or locally through submitit) ended without a result."""


def process_rank() -> int:
    """This process's rank in a multi-process run (0 when alone), from the variables the launchers set: torchrun,
    srun (one task per device on SLURM) or Lightning's own process launcher."""
    names = ["RANK", "LOCAL_RANK"]
    if os.environ.get("SLURM_NTASKS", "1").isdigit() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        names.insert(1, "SLURM_PROCID")
    for var in names:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def end_on_broken_pipe() -> NoReturn:
    """The reader of stdout went away (``eval.py --help | head -1``): end quietly, as a Unix tool ends on SIGPIPE.
    stdout is pointed at /dev/null so the interpreter's final flush has nowhere to fail (Python's documented
    recipe for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(128 + signal.SIGPIPE)


def exit_on_error(fn: F) -> F:
    """Turn a CharLSTMError into one line on stderr and a non-zero exit status (for entry points).

    In a multi-process run every rank exits with the same status; an interruption is reported by rank 0
    only (all ranks stop together), any other error by the rank that saw it, prefixed with its number.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return fn(*args, **kwargs)
            except BrokenPipeError:
                end_on_broken_pipe()
            except OSError as err:  # a write no code path expected to fail: still one line
                failed = write_failure(err)
                if failed is None:
                    raise
                raise storage_error(failed) from err
        except CharLSTMError as err:
            rank = process_rank()
            line = " ".join(str(err).split("\n"))
            if logging.getLogger().handlers:  # into train.log too (the console gets the line below)
                logging.getLogger("charlstm").error("%s: %s", err.prefix, line, extra={"file_only": True})
            if rank == 0:
                print(f"{err.prefix}: {line}", file=sys.stderr, flush=True)
            elif not isinstance(err, TrainingInterrupted):
                print(f"{err.prefix} (rank {rank}): {line}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)

    return wrapper  # type: ignore[return-value]
