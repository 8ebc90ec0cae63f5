"""Every command the README and the pages under docs/ show in their code blocks, run as written (shrunk to tiny sizes
and a few steps): each exits 0, or fails in exactly the one line the page promises. A command added without a rule
here fails the test, so no page can promise what nobody ran.

`python benchmarks/X.py ...` lines take minutes by design: their arguments are parsed by the script's own argument
parser (an unknown or misspelt option fails), and the script is not run further."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.cli import ROOT, ok, one_line_error, run_cli
from tests.conftest import BASE_SHAPE
from tests.test_docs import PAGES  # the README, every page of docs/ and the base model's README

pytestmark = pytest.mark.slow

_COMMAND = re.compile(
    r"^((?:python (?:train|generate|eval|benchmarks/[a-z0-9_]+)\.py|make [a-z]+|tensorboard)(?:\s.*?)?)\s*(?:#\s.*)?$"
)
# commands the test leaves out, and why
NOT_RUN = {"tensorboard": "starts a server"}

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
    "docs": "rewrites docs/configuration.md, which tests/test_config_reference.py compares with the configs",
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


def page_commands(page: Path) -> list[str]:
    """The runnable commands of a page's code blocks, in order, comments stripped."""
    found, in_block = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        m = _COMMAND.match(line.strip()) if in_block else None
        if m:
            found.append(m.group(1).strip())
    return found


def readme_commands() -> list[str]:
    """The commands of every page, in order, each once."""
    return list(dict.fromkeys(c for page in PAGES for c in page_commands(page)))


def is_run_checkpoint(arg: str) -> bool:
    """`ckpt=outputs/…/checkpoints/last.ckpt` or a dated example path: stands for a real run's checkpoint."""
    value = arg.partition("=")[2]
    return "ELLIPSIS" in arg or (value.startswith("outputs/") and value.endswith(".ckpt"))


def parse_benchmark_args(script: str, args: list[str]) -> None:
    """Run the benchmark's main() only as far as its argument parser: the parsed arguments end it."""

    class Parsed(Exception):
        pass

    original, parsed = argparse.ArgumentParser.parse_args, []

    def parse_only(self, _args=None, namespace=None):
        parsed.append(original(self, args, namespace))  # exits 2 on an unknown option or a bad value
        raise Parsed

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import their shared benchlib
        spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", ROOT / script)
        assert spec and spec.loader, script
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        with pytest.raises(Parsed):
            module.main()
    only = getattr(parsed[0], "only", None)
    if only and hasattr(module, "SECTIONS"):  # `--only NAME` names sections the script has
        assert set(only.split(",")) <= set(module.SECTIONS), (script, only, module.SECTIONS)


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
    if command.split()[0] in NOT_RUN:
        return None
    words = shlex.split(command.replace("…", "ELLIPSIS"))
    script, args = words[1], words[2:]
    if script.startswith("benchmarks/"):
        return script, args
    # `outputs/…/checkpoints/last.ckpt` stands for a real run's checkpoint
    args = [f"{a.split('=', 1)[0]}={newest_last(cwd)}" if is_run_checkpoint(a) else a for a in args]
    if script == "generate.py":
        return script, [*args, "length=20"]
    if script == "eval.py":  # a corpus named on the command line is scored on its first chars only
        return script, [*args, "data.max_chars=4000"] if any(a.startswith("data=") for a in args) else args
    if "--cfg" in args or "--help" in args:
        return script, args
    resume = any(a.startswith("ckpt_path=") for a in args)
    if resume:
        ckpt = newest_last(cwd) if "ckpt_path=last" in args else Path(next(a for a in args if "ckpt_path=" in a)[10:])
        step = torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]
        return script, [*args, f"trainer.max_steps={step + 3}", "trainer.max_epochs=-1", "sample.length=0"]
    extra = [*TRAIN_SHRINK, "trainer.max_steps=4"]
    if any(a in ("init_from=base", "experiment=finetune") for a in args):  # from the base model: its shape
        extra = [a for a in extra if not a.startswith(BASE_SHAPE)]
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


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the README's example files and one finished run, so that commands that resume or generate
    from `last` have a checkpoint; each command runs in its own copy of it."""
    base = tmp_path_factory.mktemp("readme_base")
    for name, text in FILES.items():
        (base / name).write_text(text, encoding="utf-8")
    ok(run_cli("train.py", *TRAIN_SHRINK, "trainer.max_steps=4", cwd=base))
    return base


def make_target(command: str) -> str | None:
    return command[5:].partition(" ")[0] if command.startswith("make ") else None


# the commands this test runs: all of them but those it leaves out, each for its stated reason
COMMANDS = [c for c in readme_commands() if make_target(c) not in MAKE_NOT_RUN and c.split()[0] not in NOT_RUN]


def test_every_make_target_the_readme_shows_is_run_or_left_out_for_a_reason():
    targets = {make_target(c) for c in readme_commands()} - {None}
    unknown = targets - set(MAKE) - set(MAKE_NOT_RUN)
    assert not unknown, f"README shows make {unknown}: add them to MAKE or MAKE_NOT_RUN in this test"
    assert targets & set(MAKE), "the README runs no make target"


@pytest.mark.parametrize("n", range(len(COMMANDS)), ids=[f"{n}:{c[:60]}" for n, c in enumerate(COMMANDS)])
def test_every_readme_command_runs_or_fails_as_promised(n, first_run, tmp_path):
    command = COMMANDS[n]
    cwd = tmp_path / "work"
    shutil.copytree(first_run, cwd)
    todo = prepare(command, cwd, n)
    assert todo is not None, command
    script, args = todo
    if script.startswith("benchmarks/"):
        parse_benchmark_args(script, args)
        return
    if any(re.search(p, command) for p in COMPOSE_ONLY):
        ok(run_cli("tests/dry_submit.py", *args, cwd=cwd))
        return
    started = time.monotonic()
    done = run_cli(script, *args, cwd=cwd, timeout=300)
    print(f"{time.monotonic() - started:5.1f} s  {command}")
    expected = next((e for p, e in EXPECTED_ERRORS if re.search(p, command)), None) if NO_GPU else None
    if expected:
        assert re.search(expected, one_line_error(done)), (command, done.stderr)
    else:
        assert done.returncode == 0, f"`{command}` -> exit {done.returncode}:\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, (command, done.stderr[-3000:])
