"""Every command the README shows, run as written (shrunk to tiny sizes and a few steps): each exits 0, or fails
in exactly the one line the README promises. A command added to the README without a rule here fails the test,
so the README cannot promise what nobody ran."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest
import torch

from tests.cli import ROOT, ok, one_line_error, run_cli

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
_COMMAND = re.compile(r"^((?:python (?:train|generate|eval)\.py|make [a-z]+)(?:\s.*?)?)\s*(?:#\s.*)?$")

# `make` targets: what each runs, or why the test leaves it out
MAKE = {
    "train": "python train.py",
    "generate": "python generate.py ckpt=last",
    "sweep": "python train.py -m model.units=64,128 data.seq_len=50,100",
}
MAKE_NOT_RUN = {
    "test": "is this suite",
    "lint": "runs ruff, which CI's own lint step covers",
    "format": "rewrites files",
    "bench": "takes many minutes by design",
    "clean": "deletes runs and caches",
    "install": "the suite already runs inside the installed environment",
    "tensorboard": "starts a server",
    "help": "only lists targets",
    "search": "the Optuna search has its own tests",
    "eval": "runs python eval.py ckpt=last, shown and run below",
}
# (pattern in the command, expected one error line) where the README promises a refusal on this machine
NO_GPU = not torch.cuda.is_available()
EXPECTED_ERRORS = [
    (r"trainer\.accelerator=gpu|trainer=gpu\b|trainer=ddp\b", r"^error: trainer\.accelerator=gpu but no CUDA GPU"),
]
# commands that need a cluster: run through Hydra, the launcher and submitit up to the sbatch call
# (tests/dry_submit.py), so their configs cannot rot; never submitted
COMPOSE_ONLY = (r"hydra/launcher=submitit_slurm",)
TRAIN_SHRINK = ["data.max_chars=4000", "model.units=8", "model.embed_dim=8", "data.val_max_windows=128",
                "sample.length=20", "callbacks.text_sample.length=10", "trainer.enable_progress_bar=false"]  # fmt: skip
FILES = {
    "my.txt": "my own text, line after line.\nanother line; with punctuation!\n" * 60,
    "held_out.txt": "my own text, held out.\nanother line!\n" * 20,
    "opening.txt": "when shall we three meet again\n",
    "prompt.txt": "macbeth.\n",
}


def readme_commands() -> list[str]:
    """The runnable commands of the README's code blocks, in order, comments stripped."""
    found, in_block = [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        m = _COMMAND.match(line.strip()) if in_block else None
        if m:
            found.append(m.group(1).strip())
    return found


def newest_last(cwd: Path) -> Path:
    found = sorted((cwd / "outputs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert found, "no run has written last.ckpt yet"
    return found[-1]


def prepare(command: str, cwd: Path, n: int) -> tuple[str, list[str]] | None:
    """(script, arguments) to run for a README command, shrunk; None when the command is not run."""
    if command.startswith("make "):
        target, _, rest = command[5:].partition(" ")
        if target in MAKE_NOT_RUN:
            return None
        assert target in MAKE, f"README shows `{command}`: add the target to MAKE or MAKE_NOT_RUN in this test"
        command = f"{MAKE[target]} {rest}".strip()
    words = shlex.split(command.replace("…", "ELLIPSIS"))
    script, args = words[1], words[2:]
    # `outputs/…/checkpoints/last.ckpt` stands for a real run's checkpoint
    args = [f"{a.split('=', 1)[0]}={newest_last(cwd)}" if "ELLIPSIS" in a else a for a in args]
    if script == "generate.py":
        return script, [*args, "length=20"]
    if script == "eval.py":
        return script, args
    if "--cfg" in args or "--help" in args:
        return script, args
    resume = any(a.startswith("ckpt_path=") for a in args)
    if resume:
        ckpt = newest_last(cwd) if "ckpt_path=last" in args else Path(next(a for a in args if "ckpt_path=" in a)[10:])
        step = torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]
        return script, [*args, f"trainer.max_steps={step + 3}", "trainer.max_epochs=-1", "sample.length=0"]
    extra = [*TRAIN_SHRINK, "trainer.max_steps=4"]
    if "-m" in args:
        extra.append(f"hydra.sweep.dir={cwd / 'sweeps' / str(n)}")
        if "hparams_search" in command:
            extra.append("hydra.sweeper.n_trials=2")
    return script, [*args, *extra]


def test_readme_shows_commands():
    commands = readme_commands()
    assert len(commands) >= 15
    assert any(c.startswith("python train.py") for c in commands)
    assert any(c.startswith("python generate.py") for c in commands)


def test_every_readme_command_runs_or_fails_as_promised(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    # a first run, so that commands that resume or generate from `last` have a checkpoint
    ok(run_cli("train.py", *TRAIN_SHRINK, "trainer.max_steps=4", cwd=tmp_path))
    for n, command in enumerate(readme_commands()):
        todo = prepare(command, tmp_path, n)
        if todo is None:
            continue
        script, args = todo
        if any(re.search(p, command) for p in COMPOSE_ONLY):
            ok(run_cli("tests/dry_submit.py", *args, cwd=tmp_path))
            continue
        started = time.monotonic()
        done = run_cli(script, *args, cwd=tmp_path, timeout=300)
        print(f"{time.monotonic() - started:5.1f} s  {command}")
        expected = next((e for p, e in EXPECTED_ERRORS if re.search(p, command)), None) if NO_GPU else None
        if expected:
            assert re.search(expected, one_line_error(done)), (command, done.stderr)
        else:
            assert done.returncode == 0, f"`{command}` -> exit {done.returncode}:\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr, (command, done.stderr[-3000:])
