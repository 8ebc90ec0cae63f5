"""Running the entry points as a user does: a real process, the repository's scripts, any working folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import forkserver

ROOT = Path(__file__).resolve().parents[1]

# Tiny but real: every command keeps its recipe and shape, only smaller and shorter.
SHRINK = ["data.max_chars=4000", "model.units=8", "model.embed_dim=8", "data.val_max_windows=128",
          "sample.length=30", "callbacks.text_sample.length=20"]  # fmt: skip


def run_cli(
    script: str, *args: str, cwd: Path, timeout: float = 240, fresh: bool = False
) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from ``cwd``, with the test environment (one thread): a new process forked from a
    server that has the libraries imported (tests/forkserver.py), or a cold ``python`` with ``fresh=True``."""
    return forkserver.run([sys.executable, str(ROOT / script), *args], cwd, cli_env(), timeout, fresh)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment commands run with: one thread, unbuffered output, no Hydra full tracebacks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def one_line_error(done: subprocess.CompletedProcess, prefix: str = "error: ") -> str:
    """The single line a refused command prints; fails the test on a traceback or several lines."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, f"expected a failure, got exit 0:\n{done.stdout[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(prefix), done.stderr[-3000:]
    return lines[0]


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (
        f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def run_folders(outputs: Path) -> list[Path]:
    """Run folders (those holding a config.yaml) under ``outputs``, oldest first."""
    return sorted(
        (p.parent for p in outputs.rglob("config.yaml") if ".hydra" not in p.parts), key=lambda p: p.stat().st_mtime
    )


def into_closed_pipe(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a command whose stdout is a pipe the reader has already closed (``cmd | head -1`` once head is done): its
    read end is closed before the command writes, so every write meets the closed pipe. stderr is captured."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(args, stdout=write_end, stderr=subprocess.PIPE, env=cli_env(**env), cwd=cwd, text=True)
    os.close(read_end)
    os.close(write_end)
    _, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(args, proc.returncode, None, err)


def on_a_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run a command with a terminal (a pty) as its stdout and stderr: its exit status and what the terminal showed."""
    import pty

    main, child = pty.openpty()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")
