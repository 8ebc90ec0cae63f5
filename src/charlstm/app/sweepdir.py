"""One sweep at a time in a sweep folder: the multirun's main process holds an exclusive ``fcntl.flock`` on
``.sweep.lock`` there while it runs (the kernel drops it when the process ends, even by kill -9), and the lock file
names the job folders an earlier sweep left there, which this sweep's summary leaves out."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from charlstm.app.rundir import SWEEP_LOCK, take_lock
from charlstm.core.errors import ConfigError

# sweep folder -> the open lock file of the sweep this process runs there
_held: dict[Path, IO[str]] = {}


def _read(sweep_dir: Path) -> dict[str, Any]:
    try:
        info = json.loads((sweep_dir / SWEEP_LOCK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def hold(sweep_dir: str | os.PathLike[str]) -> None:
    """Take ``sweep_dir`` for the multirun this process runs, or refuse in one line when another sweep runs there."""
    sweep_dir = Path(sweep_dir)
    if sweep_dir.resolve() in _held:
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    earlier = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    fh = take_lock(sweep_dir / SWEEP_LOCK, json.dumps({"pid": os.getpid(), "earlier_jobs": earlier}) + "\n")
    if fh is None:
        holder = _read(sweep_dir).get("pid", "unknown")
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir} is in use by another sweep (process {holder}); wait for it to end, or give "
            "this one another hydra.sweep.dir"
        )
    _held[sweep_dir.resolve()] = fh


def release(sweep_dir: str | os.PathLike[str]) -> None:
    """Let another sweep use ``sweep_dir`` (the end of this process does the same)."""
    fh = _held.pop(Path(sweep_dir).resolve(), None)
    if fh is not None:
        fh.close()


def earlier_jobs(sweep_dir: str | os.PathLike[str]) -> set[str]:
    """The folders in ``sweep_dir`` that were there when its latest sweep started (an earlier sweep's jobs)."""
    return set(_read(Path(sweep_dir)).get("earlier_jobs") or [])
