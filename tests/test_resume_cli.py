"""Resume as users type it: the run's own command with ``ckpt_path`` added goes on in the run's own folder (its
train.log, result.json history and recipe), a real change is refused naming the key, a moved corpus is accepted
when it holds the same bytes, and a run folder is trained into by one process at a time."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli import ROOT, SHRINK, cli_env, ok, one_line_error, run_cli, run_folders
from tests.conftest import TUTORIAL_SHAPE

FIRST, MORE = "trainer.max_steps=4", "trainer.max_steps=8"
QUIET = ("sample.length=0", "callbacks.text_sample=null")


def train(cwd: Path, data_dir: Path, *args: str, fresh: bool = False) -> subprocess.CompletedProcess:
    return run_cli("train.py", *args, *QUIET, f"paths.data_dir={data_dir}", cwd=cwd, fresh=fresh)


def headers(run: Path) -> list[str]:
    """The ``training: ...`` line each process wrote into the run's train.log."""
    lines = (run / "train.log").read_text(encoding="utf-8").splitlines()
    return [line.split("[INFO] ", 1)[1] for line in lines if "[charlstm.app.train][INFO] training: " in line]


@pytest.mark.parametrize(
    ("recipe", "args"),
    [
        ("seed", ["experiment=seed", "data.max_chars=30000", "model.units=32"]),  # windows, normalized input
        ("charrnn", ["experiment=charrnn", *SHRINK]),  # streams
        ("plays", ["experiment=plays", "trainer.max_epochs=3", *SHRINK]),  # streams over the other plays too
        ("default", ["data=shakespeare", "data.max_chars=30000", *SHRINK]),  # the default recipe on every play
        ("none", ["~experiment", *TUTORIAL_SHAPE, "data.layout=streams", *SHRINK]),  # no recipe: the plain groups
    ],
)
def test_the_runs_own_command_with_ckpt_path_goes_on_in_its_folder(tmp_path, data_dir, recipe, args):
    ok(train(tmp_path, data_dir, *args, FIRST))
    (run,) = run_folders(tmp_path / "outputs")
    last = run / "checkpoints" / "last.ckpt"
    before = json.loads((run / "result.json").read_text())

    ok(train(tmp_path, data_dir, *args, MORE, f"ckpt_path={last}"))
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 8
    # no second folder (nor a stub with resumed.txt, .hydra or train.log) anywhere under outputs/
    assert run_folders(tmp_path / "outputs") == [run]
    assert [p.parent for p in (tmp_path / "outputs").rglob("train.log")] == [run]
    assert not list(tmp_path.rglob("resumed.txt"))
    # the run's own log goes on, and both headers name the run's recipe
    assert len(headers(run)) == 2 and all(h.startswith(f"training: recipe {recipe},") for h in headers(run))
    assert f"resuming {last} at step 4 in {run}" in (run / "train.log").read_text()
    # the first command's .hydra is kept; the resume's config is beside the run's own
    assert "ckpt_path" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert (run / "config.yaml").is_file() and (run / "config-resume-1.yaml").is_file()
    # result.json: the whole history, the first process's validations first
    after = json.loads((run / "result.json").read_text())
    assert after["history"][: len(before["history"])] == before["history"] and after["history"][-1][0] == 8
    assert after["state"] == "complete" and after["steps"] == 8


def test_a_changed_setting_is_refused_naming_it_and_the_run_is_left_as_it_was(tmp_path, data_dir):
    first = ["experiment=seed", "data.max_chars=30000", "model.units=32"]
    ok(train(tmp_path, data_dir, *first, FIRST))
    (run,) = run_folders(tmp_path / "outputs")
    last = run / "checkpoints" / "last.ckpt"
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in ("train.log", ".lock")}
    where = f"({run / 'config.yaml'}); resume without it (the run keeps its own settings), or start a new run"
    cases = [
        # the unchanged data.max_chars is not blamed for the changed model.units
        ([*first, "model.units=64"], "model.units=64 would change model.units of the run being resumed from 32 to 64"),
        (["data.seq_len=100"], "data.seq_len=100 would change data.seq_len of the run being resumed from 50 to 100"),
        (
            ["experiment=charrnn"],
            "experiment=charrnn would change the experiment of the run being resumed from seed to charrnn",
        ),
        (
            ["data=shakespeare"],
            "data=shakespeare would change the data of the run being resumed from macbeth to shakespeare",
        ),
    ]
    for args, expected in cases:
        line = one_line_error(train(tmp_path, data_dir, *args, MORE, f"ckpt_path={last}"))
        assert line.startswith(f"error: {expected} {where}"), line
    # a new run given the run's folder as its hydra.run.dir would mix two runs' files in it
    line = one_line_error(train(tmp_path, data_dir, *first, FIRST, f"hydra.run.dir={run}"))
    assert line == f"error: run folder {run} already holds a run; resume it with ckpt_path={last}, or choose another " \
                   "hydra.run.dir"  # fmt: skip
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in ("train.log", ".lock")} == files
    assert len(headers(run)) == 1 and run_folders(tmp_path / "outputs") == [run]
    # the learning rate may change (a run that diverged goes on with a smaller one), and so may the logger
    done = ok(train(tmp_path, data_dir, *first, "model.lr=0.0005", "logger=csv", MORE, f"ckpt_path={last}"))
    assert (run / "csv" / "metrics.csv").is_file()
    assert "resuming with model.lr=0.0005 (the run had 0.001)" in done.stdout
    assert torch.load(last, weights_only=True, map_location="cpu")["hyper_parameters"]["lr"] == 0.0005


def test_a_moved_corpus_is_accepted_when_it_holds_the_same_text(tmp_path, data_dir):
    first, moved = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir(), moved.mkdir()
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))
    (first / "my.txt").write_text(text, encoding="utf-8")
    args = ["~experiment", *TUTORIAL_SHAPE, "data=file", "data.path=my.txt", *SHRINK, "paths.outputs_root=../outputs"]
    ok(train(first, data_dir, *args, FIRST))
    (run,) = run_folders(tmp_path / "outputs")
    last = run / "checkpoints" / "last.ckpt"
    score = ok(run_cli("eval.py", f"ckpt={last}", cwd=first)).stdout
    shutil.move(first / "my.txt", moved / "moved.txt")
    (moved / "other.txt").write_text(text.replace("fox", "cat"), encoding="utf-8")

    # from another folder, the run's corpus where it is now: scored and resumed as before
    assert ok(run_cli("eval.py", f"ckpt={last}", "data.path=moved.txt", cwd=moved)).stdout == score
    resume = [f"ckpt_path={last}", MORE, "paths.outputs_root=../outputs"]
    ok(train(moved, data_dir, *resume, "data.path=moved.txt"))
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 8

    # another text of the same size and characters is refused in one line, by both
    expected = (
        f"error: data.path=other.txt is not the text the run in {run} trained on (its corpus was {first / 'my.txt'}"
    )
    line = one_line_error(run_cli("eval.py", f"ckpt={last}", "data.path=other.txt", cwd=moved))
    assert line.startswith(expected), line
    line = one_line_error(train(moved, data_dir, *resume, "trainer.max_steps=12", "data.path=other.txt"))
    assert line.startswith(expected), line


def holder(lock: Path) -> str:
    """The pid in ``lock`` while a process holds it, else ''."""
    with open(lock, encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip()
        fcntl.flock(fh, fcntl.LOCK_UN)
        return ""


def test_a_run_being_trained_is_not_trained_into_by_a_second_process(tmp_path, data_dir):
    args = ["~experiment", *TUTORIAL_SHAPE, *SHRINK, "callbacks.early_stopping=null"]
    ok(train(tmp_path, data_dir, *args, FIRST))
    (run,) = run_folders(tmp_path / "outputs")
    last = run / "checkpoints" / "last.ckpt"
    log = (tmp_path / "first.out").open("w")
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, *QUIET, f"paths.data_dir={data_dir}",
         "trainer.max_steps=-1", "trainer.max_epochs=100000", f"ckpt_path={last}"],
        cwd=tmp_path, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        while holder(run / ".lock") != str(first.pid):  # until it holds the run folder
            assert first.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
            time.sleep(0.2)
        result = (run / "result.json").read_bytes()
        busy = f"error: run folder {run} is in use: process {first.pid} is training into it; "
        done = train(tmp_path, data_dir, *args, MORE, f"ckpt_path={last}")
        assert one_line_error(done) == busy + "wait for it to end or stop it, then resume"
        assert done.returncode == 1
        done = train(tmp_path, data_dir, *args, FIRST, f"hydra.run.dir={run}")
        assert one_line_error(done) == busy + "choose another hydra.run.dir"
        assert (run / "result.json").read_bytes() == result
        assert not (run / "config-resume-2.yaml").exists()
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
        log.close()
    # the kernel dropped the lock with the killed process: the run resumes
    assert holder(run / ".lock") == ""
    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    ok(train(tmp_path, data_dir, *args, f"trainer.max_steps={step + 4}", f"ckpt_path={last}"))
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == step + 4


@pytest.mark.parametrize(
    ("damage", "why"),
    [("data: [unclosed\n", "invalid YAML at line 2"), ("", "empty"), ("- a list\n", "not a run's settings")],
    ids=["invalid", "empty", "foreign"],
)
def test_a_damaged_config_yaml_is_one_line_naming_it_for_resume_and_eval(tmp_path, data_dir, damage, why):
    ok(train(tmp_path, data_dir, "~experiment", *TUTORIAL_SHAPE, *SHRINK, FIRST, "paths.outputs_root=outputs"))
    (run,) = run_folders(tmp_path / "outputs")
    (run / "config.yaml").write_text(damage, encoding="utf-8")
    last = run / "checkpoints" / "last.ckpt"
    expected = f"error: {run / 'config.yaml'} cannot be read ({why}): it holds the run's settings; restore it from"
    line = one_line_error(train(tmp_path, data_dir, f"ckpt_path={last}", MORE))
    assert line.startswith(expected) and line.endswith("or start a new run"), line
    line = one_line_error(run_cli("eval.py", f"ckpt={last}", cwd=tmp_path))
    assert line.startswith(expected) and line.endswith("to score a text"), line
