"""Faults and bad input on the command line: Ctrl-C at any moment, values too large for the machine, lists and
escapes typed in a shell. Each refusal is one line on stderr (at most 3, no traceback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import SHRINK, cli_env

ROOT = Path(__file__).resolve().parents[1]


def short_stderr(done: subprocess.CompletedProcess) -> list[str]:
    """The non-empty stderr lines of a command that must say at most one short thing."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-3000:]
    assert len(lines) <= 3, done.stderr[-3000:]
    return lines


# -- Ctrl-C at any moment ----------------------------------------------------------------------------------------
# A sitecustomize module that sends this process SIGINT at a chosen moment: when a given module starts to be
# imported (Ctrl-C while the imports load), or from an exit handler (Ctrl-C, once or twice, after the command ended).
SITECUSTOMIZE = """
import atexit, importlib.abc, os, signal, sys

at = os.environ["SIGINT_AT"]

def ctrl_c(times=1):
    for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)

class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if at == "import:" + name:
            sys.meta_path.remove(self)
            ctrl_c()
        elif at.startswith("exit:") and name == "charlstm.cli":  # an exit handler registered by the command
            sys.meta_path.remove(self)
            atexit.register(ctrl_c, int(at[5:]))
        return None

sys.meta_path.insert(0, Hook())
"""


def run_with_sigint(tmp_path: Path, at: str, script: str, *args: str) -> subprocess.CompletedProcess:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = cli_env(SIGINT_AT=at, PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip


@pytest.mark.parametrize(
    "script, module",
    [
        ("train.py", "charlstm.cli"),
        ("train.py", "hydra"),
        ("train.py", "torch"),
        ("train.py", "pytorch_lightning"),
        ("generate.py", "torch"),
        ("eval.py", "omegaconf"),
    ],
)
def test_ctrl_c_while_the_imports_load_exits_130_quietly(tmp_path, script, module):
    root = "outputs_root" if script == "generate.py" else "paths.outputs_root"
    done = run_with_sigint(tmp_path, f"import:{module}", script, f"{root}={tmp_path}")
    assert done.returncode == 130, done.stderr[-3000:]
    assert short_stderr(done) == []


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_after_the_command_ended_exits_130_without_exception_ignored(tmp_path, presses):
    # the command itself ends with its one error line (no checkpoint there); Ctrl-C comes while it exits
    done = run_with_sigint(tmp_path, f"exit:{presses}", "generate.py", f"outputs_root={tmp_path}")
    assert done.returncode == 130, done.stderr[-3000:]
    lines = short_stderr(done)
    assert len(lines) == 1 and lines[0].startswith("error: no last.ckpt"), lines


@pytest.mark.parametrize("after", [0.2, 1.0, 2.0])
def test_ctrl_c_at_a_moment_of_a_training_command_exits_130_with_at_most_one_line(tmp_path, after):
    args = [*SHRINK, "~experiment", "trainer.max_epochs=50", "callbacks.rich_progress_bar=null",
            f"paths.outputs_root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert done.returncode == 130, err[-3000:]
    lines = short_stderr(done)
    assert len(lines) <= 1 and all(line.startswith("interrupted: SIGINT") for line in lines), lines
