"""Faults and bad input on the command line: Ctrl-C at any moment, values too large for the machine, lists and
escapes typed in a shell. Each refusal is one line on stderr (at most 3, no traceback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from charlstm.app.cli import split_by_shell
from charlstm.core.errors import ConfigError
from charlstm.training.datamodule import fixed_vocab
from tests.cli import SHRINK, cli_env, into_closed_pipe, one_line_error, run_cli
from tests.conftest import TUTORIAL_SHAPE, compose_cfg

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
        elif at.startswith("exit:") and name == "charlstm.app.cli":  # an exit handler registered by the command
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
        ("train.py", "charlstm.app.cli"),
        ("train.py", "hydra"),
        ("train.py", "torch"),
        ("train.py", "pytorch_lightning"),
        ("generate.py", "torch"),
        ("generate.py", "numpy"),  # imported by torch's C++ start-up: there a KeyboardInterrupt was lost
        ("train.py", "numpy"),
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
    args = [*SHRINK, "~experiment", *TUTORIAL_SHAPE, "trainer.max_epochs=50", "callbacks.rich_progress_bar=null",
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


# -- lists and escapes typed in a shell ----------------------------------------------------------------------------
# `python train.py data.vocab=["\n", " ", "!", "-", "a"]` typed unquoted: what bash passes
SPLIT_VOCAB = ["data.vocab=[\\n,", " ,", "!,", "-,", "a]"]


@pytest.mark.parametrize("pieces", [SPLIT_VOCAB, [*SPLIT_VOCAB[:3], "a]"], ["model.units=choice(64,", "128)"]])
def test_an_override_the_shell_split_at_its_spaces_is_one_line_saying_how_to_quote(tmp_path, pieces):
    done = run_cli("train.py", *pieces, f"paths.outputs_root={tmp_path}", cwd=tmp_path)
    line = one_line_error(done)
    key = pieces[0].split("=")[0]
    assert line.startswith(f"error: {pieces[0]}... was split by the shell at its spaces into {len(pieces)} arguments")
    assert "put the whole override in single quotes" in line and f"'{key}=[" in line
    assert not list(tmp_path.glob("20*"))  # refused before any run folder


def test_a_list_with_its_brackets_closed_is_left_to_hydra():
    assert split_by_shell(["data.vocab=[a,b]", "model.units=choice(8,16)", "prompt=a (b", "x=1"]) is None


def test_data_vocab_takes_the_usual_escapes_from_the_command_line():
    cfg = compose_cfg("train", ['data.vocab=["\\n", " ", "\\t", "\\\\", "\\u00e9", a, "\\x21"]'])
    assert fixed_vocab(cfg.data.vocab).to_list() == ["\n", " ", "\t", "\\", "é", "a", "!"]
    with pytest.raises(ConfigError, match=r"data.vocab element '\\\\q' is not a single character.*escapes name one"):
        fixed_vocab(["a", "\\q"])
    with pytest.raises(ConfigError, match=r"data.vocab lists '\\n' twice"):
        fixed_vocab(["\n", "\\n"])


# -- values too large for the machine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir) -> dict:
    """A tiny trained checkpoint and a 1 MB text in its vocabulary."""
    from omegaconf import open_dict

    from charlstm.app.train import train
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("faults_run")
    cfg = compose_cfg("train", [*TINY, "sample.length=0", "callbacks.text_sample=null"])
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.outputs_root, cfg.paths.data_dir = str(root / "run"), str(root), str(data_dir)
    _, objects = train(cfg)
    dm = objects.datamodule
    text = dm.vocab.decode(dm.train_ids)
    big = root / "big.txt"
    big.write_text(text * (2**20 // len(text) + 1), encoding="utf-8")
    return {"ckpt": root / "run" / "checkpoints" / "last.ckpt", "text": big, "root": root}


def run_under_memory_limit(
    tmp_path: Path, script: str, *args: str, headroom: int = 2**30
) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` with an address-space limit (``ulimit -v``) of ``headroom`` bytes beyond what the
    libraries it imports take: a machine or a job with little memory, on any machine. A process of its own, forked
    with the libraries already imported (tests/forkserver.py), which sets the limit before it runs the script."""
    limited = tmp_path / "limited.py"
    limited.write_text(
        textwrap.dedent(f"""
        import os, resource, runpy, sys
        import torch, hydra, omegaconf, pytorch_lightning
        import charlstm.app.train, charlstm.app.evaluate, charlstm.app.generate, charlstm.app.cli
        mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + {headroom}, resource.RLIM_INFINITY))
        sys.argv = [{str(ROOT / script)!r}, *{list(args)!r}]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """)
    )
    return run_cli(str(limited), cwd=tmp_path, timeout=300)


def test_generate_threads_beyond_the_cores_is_one_line(tmp_path):
    from charlstm.core.hardware import usable_cores

    done = run_cli("generate.py", "ckpt=none.ckpt", "threads=100000", cwd=tmp_path)
    line = one_line_error(done)
    assert line.startswith("error: threads=100000 is not allowed") and f"from 1 to {usable_cores()}" in line


def test_num_samples_beyond_the_memory_is_one_line_before_any_allocation(tmp_path, tiny_run):
    done = run_under_memory_limit(tmp_path, "generate.py", f"ckpt={tiny_run['ckpt']}", "num_samples=100000000")
    line = one_line_error(done)
    assert line.startswith("error: num_samples=100000000 needs at least ") and "lower num_samples (at most" in line


def test_eval_batch_size_beyond_the_memory_is_one_line(tmp_path, tiny_run):
    args = [f"ckpt={tiny_run['ckpt']}", "data=file", f"data.path={tiny_run['text']}", "batch_size=100000000"]
    done = run_under_memory_limit(tmp_path, "eval.py", *args, headroom=2**28)
    line = one_line_error(done)
    assert line.startswith("error: batch_size=100000000 needs at least ") and "windows of" in line
    assert "lower batch_size (at most" in line


def test_a_training_batch_beyond_the_memory_is_one_line_and_leaves_no_run_folder(tmp_path, data_dir):
    args = [*SHRINK, "~experiment", *TUTORIAL_SHAPE,
            "data.max_chars=200000", "data.batch_size=100000", "trainer.max_steps=1",
            f"paths.data_dir={data_dir}", f"paths.outputs_root={tmp_path / 'outputs'}"]  # fmt: skip
    done = run_under_memory_limit(tmp_path, "train.py", *args, headroom=2**28)
    line = one_line_error(done)
    assert line.startswith("error: data.batch_size=100000 needs at least ") and "lower data.batch_size" in line
    assert not list((tmp_path / "outputs").rglob("*.yaml"))  # no run folder left behind


# -- a reader that goes away --------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["generate.py", "eval.py"])
def test_help_piped_into_a_reader_that_went_away_ends_quietly(script):
    """`python generate.py --help | head -1`: once the reader has closed the pipe, the command ends as a Unix tool
    does on SIGPIPE (status 141), with nothing on stderr."""
    done = into_closed_pipe([sys.executable, str(ROOT / script), "--help"], ROOT)
    assert (done.returncode, done.stderr) == (128 + signal.SIGPIPE, "")
