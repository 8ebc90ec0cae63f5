"""The body of train.py, generate.py and eval.py, and their exit status after a Ctrl-C at any moment.

Light on purpose: imported before torch, Lightning and Hydra load, so a Ctrl-C while they load is one exit 130."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

from charlstm.core.errors import end_on_broken_pipe

# -- Ctrl-C at any moment of a command ------------------------------------------------------------------------------
_interrupted_at_exit = False


def _on_sigint_at_exit(signum: int, frame: Any) -> None:
    """Ctrl-C once the command has ended: the exit handlers still flush logs and close files, then the status is
    130; a second Ctrl-C ends the process at once."""
    global _interrupted_at_exit
    if _interrupted_at_exit:
        os._exit(128 + signal.SIGINT)
    _interrupted_at_exit = True


def _exit_status_after_interrupt() -> None:
    if _interrupted_at_exit:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # closed, or the reader went away
                stream.flush()
        os._exit(128 + signal.SIGINT)


def run_command(script: str, config_name: str, task: str) -> None:
    """The body of train.py, generate.py and eval.py: ``charlstm.app.cli.hydra_entry`` on the configs beside ``script``,
    where Ctrl-C at any moment ends with exit status 130 and at most one line. While the imports load (seconds,
    before the command handles Ctrl-C itself) it just ends the command; once the command has ended, while the
    interpreter's exit handlers run, it no longer raises (Python would print ``Exception ignored in atexit
    callback``) but makes the status 130 (_on_sigint_at_exit). The script catches a Ctrl-C that
    comes while this module itself is imported."""
    import atexit
    from pathlib import Path

    atexit.register(_exit_status_after_interrupt)  # registered first, so it runs after every other exit handler
    try:
        from charlstm.app.cli import hydra_entry

        hydra_entry(Path(script).resolve().parent / "configs", config_name, task)
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    except BrokenPipeError:
        end_on_broken_pipe()
    finally:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job started with Ctrl-C ignored
            signal.signal(signal.SIGINT, _on_sigint_at_exit)
