"""The project's exceptions: each carries one line that names the bad thing and the fix."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class CharLSTMError(Exception):
    """A user-facing error; its message is one line printed by the entry points."""


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


def exit_on_error(fn: F) -> F:
    """Turn a CharLSTMError into one line on stderr and exit status 1 (for entry points)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CharLSTMError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
