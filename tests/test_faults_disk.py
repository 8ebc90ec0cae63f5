"""A disk that fails and a run that diverges, said in one line that names the file and what was kept.

Read-only folders and full disks are simulated where the write happens (tests/faults.py): the tests run as root,
which ignores chmod. One test uses a real read-only file system: a bind mount remounted read-only inside a private
user and mount namespace (``unshare -rm``), which needs no privilege beyond what an unprivileged user has.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from charlstm.app.cli import command_line
from charlstm.app.evaluate import evaluate
from charlstm.app.train import train
from charlstm.core import checkpoint
from charlstm.core.errors import DivergenceError
from tests.cli import ROOT, SHRINK, cli_env, ok, one_line_error, run_cli
from tests.conftest import TUTORIAL_SHAPE, compose_cfg
from tests.test_interrupt import add_callback

RUN = [*SHRINK, "trainer.max_steps=3", "sample.length=0", "trainer.enable_model_summary=false"]


def faulty(script: str, *args: str, cwd: Path, readonly: list[Path] = (), full: list[str] = ()):
    """``python SCRIPT ARGS`` on a disk whose ``readonly`` folders cannot be written and whose ``full`` files
    (globs) fill it."""
    disk = [a for p in readonly for a in ("--readonly", str(p))] + [a for g in full for a in ("--full", g)]
    return run_cli("tests/faults.py", *disk, str(ROOT / script), *args, cwd=cwd)


def readonly_line(path: Path, folder: Path) -> str:
    return (
        f"error: cannot write {path}: the file system is read-only; make {folder} writable, or write elsewhere "
        "(hydra.run.dir=..., paths.data_dir=...)"
    )


# -- read-only folders ------------------------------------------------------------------------------------------


def test_an_explicit_run_folder_on_a_read_only_disk_is_one_line(tmp_path, data_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    done = faulty("train.py", *RUN, f"hydra.run.dir={ro / 'run'}", f"paths.data_dir={data_dir}", cwd=tmp_path,
                  readonly=[ro])  # fmt: skip
    assert one_line_error(done) == readonly_line(ro / "run", ro)


def test_the_default_run_folder_on_a_read_only_disk_is_one_line_without_warnings(tmp_path, data_dir):
    for args in ([], ["-m", "seed=1,2"]):  # a run and a sweep
        done = faulty("train.py", *args, *RUN, f"paths.data_dir={data_dir}", cwd=tmp_path, readonly=[tmp_path])
        line = one_line_error(done)
        assert line.startswith(f"error: cannot write {tmp_path / 'outputs'}/") and "read-only" in line, line
    assert not (tmp_path / "outputs").exists()


def test_a_read_only_data_folder_without_a_cache_is_one_line_naming_it(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    done = faulty("train.py", *RUN, f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={ro}", cwd=tmp_path,
                  readonly=[ro])  # fmt: skip
    line = one_line_error(done)
    assert line.startswith(f"error: cannot write {ro}/") and f"make {ro}" in line and "read-only" in line, line


def test_a_read_only_data_folder_with_its_cache_is_only_read(tmp_path, data_dir):
    ok(run_cli("train.py", *RUN, f"hydra.run.dir={tmp_path / 'first'}", f"paths.data_dir={tmp_path / 'data'}",
               cwd=tmp_path))  # fmt: skip
    ok(faulty("train.py", *RUN, f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}",
              cwd=tmp_path, readonly=[tmp_path / "data"]))  # fmt: skip


def test_resuming_a_run_on_a_read_only_disk_is_one_line(tmp_path, data_dir):
    run = tmp_path / "disk" / "run"
    ok(run_cli("train.py", *RUN, f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", cwd=tmp_path))
    done = faulty("train.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=6",
                  cwd=tmp_path, readonly=[tmp_path / "disk"])  # fmt: skip
    line = one_line_error(done)
    assert line.startswith(f"error: cannot write {run}/") and "the file system is read-only" in line, line
    assert checkpoint.load(run / "checkpoints" / "last.ckpt")["global_step"] == 3


def on_a_read_only_mount(disk: Path, script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` with ``disk`` really read-only: bind-mounted onto itself and remounted read-only in a
    mount namespace of the command's own (nothing outside it sees the mount, and it ends with the command)."""
    mount = f"mount --bind {shlex.quote(str(disk))} {shlex.quote(str(disk))} && " \
            f"mount -o remount,bind,ro {shlex.quote(str(disk))}"  # fmt: skip
    command = shlex.join([sys.executable, str(ROOT / script), *args])
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && exec {command}"], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def test_a_real_read_only_disk_is_one_line_for_a_new_run_and_a_resume(tmp_path, data_dir):
    disk = tmp_path / "disk"
    run = disk / "run"
    ok(run_cli("train.py", *RUN, f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", cwd=tmp_path))
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    done = on_a_read_only_mount(disk, "train.py", *RUN, f"hydra.run.dir={disk / 'new'}", f"paths.data_dir={data_dir}",
                                cwd=tmp_path)  # fmt: skip
    assert one_line_error(done) == readonly_line(disk / "new", disk)
    done = on_a_read_only_mount(disk, "train.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                                "trainer.max_steps=6", cwd=tmp_path)  # fmt: skip
    line = one_line_error(done)
    assert line.startswith(f"error: cannot write {run}/") and "the file system is read-only" in line, line
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not (disk / "new").exists()


def test_a_log_file_that_cannot_be_made_is_one_line(tmp_path, data_dir):
    run = tmp_path / "run"
    done = faulty("train.py", *RUN, f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", cwd=tmp_path,
                  readonly=[run / "train.log"])  # fmt: skip
    assert one_line_error(done) == readonly_line(run / "train.log", run)


# -- a full disk --------------------------------------------------------------------------------------------------


def test_a_full_disk_at_start_up_is_one_line(tmp_path, data_dir):
    done = faulty("train.py", *RUN, f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={data_dir}", cwd=tmp_path,
                  full=["*/.hydra/*"])  # fmt: skip
    assert one_line_error(done) == (
        f"error: cannot write {tmp_path / 'run' / '.hydra' / 'config.yaml'}: no space left on the device; free some "
        "space there and run again"
    )


def test_a_log_file_on_a_full_disk_drops_its_lines_without_a_traceback(tmp_path, data_dir):
    done = ok(faulty("train.py", *RUN, f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={data_dir}",
                     cwd=tmp_path, full=["*/train.log"]))  # fmt: skip
    assert "Logging error" not in done.stderr and "val/bpc:" in done.stdout


def test_a_full_disk_while_preparing_a_corpus_is_one_line_and_leaves_nothing_partial(tmp_path):
    data = tmp_path / "data"
    done = faulty("train.py", *RUN, f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={data}", cwd=tmp_path,
                  full=["*/prepared/*/ids.*"])  # fmt: skip
    assert one_line_error(done) == (
        f"error: cannot write {data / 'prepared'}: no space left on the device; play macbeth was not prepared "
        "(nothing partial is kept); free some space there and run again"
    )
    assert [p.name for p in (data / "prepared").iterdir() if not p.name.endswith(".lock")] == []


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one_and_says_so(tmp_path, data_dir):
    run = tmp_path / "run"
    whole_epoch = [*SHRINK, "sample.length=0", "trainer.max_epochs=1", "trainer.limit_train_batches=3"]  # ends an epoch
    ok(run_cli("train.py", *whole_epoch, f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", cwd=tmp_path))
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    done = faulty("train.py", f"ckpt_path={last}", "trainer.max_epochs=2",
                  "callbacks.last_checkpoint.every_n_train_steps=1",
                  cwd=tmp_path, full=["*/.last.ckpt.*.tmp"])  # fmt: skip
    assert one_line_error(done) == (
        f"error: cannot write {last}: no space left on the device; the previous last.ckpt is kept unchanged; free "
        "some space there and run again"
    )
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")) == []


# -- divergence ---------------------------------------------------------------------------------------------------


class BlowUp(pl.Callback):
    """Multiplies every weight by ``factor`` after optimizer step ``step``: finite weights, as a diverging run's
    are the step before its loss overflows."""

    def __init__(self, step: int, factor: float = 1e30) -> None:
        self.step, self.factor = step, factor

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.net.parameters():
                    p.mul_(self.factor)


def tiny_cfg(tmp_path: Path, data_dir: Path, *overrides: str):
    cfg = compose_cfg("train", [*SHRINK, "~experiment", *TUTORIAL_SHAPE,
                                "trainer.max_steps=20", "sample.length=0", *overrides,
                                "callbacks.text_sample=null", "trainer.enable_progress_bar=false"])  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.outputs_root, cfg.paths.data_dir = (
            str(tmp_path / "run"),
            str(tmp_path),
            str(data_dir),
        )
    return cfg


def test_a_checkpoint_of_weights_that_gave_no_sane_loss_is_not_kept(tmp_path, data_dir):
    """Saved every step: the weights saved at step 5 are finite but blown up, so the next loss is huge; last.ckpt
    goes back to step 4, which evaluates to a finite score, and the line says so and how to resume it."""
    cfg = tiny_cfg(tmp_path, data_dir, "callbacks.last_checkpoint.every_n_train_steps=1")
    add_callback(cfg, "blow_up", BlowUp, step=5)
    with pytest.raises(DivergenceError) as info:
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert str(info.value).startswith("training loss became ")
    assert str(info.value).endswith(
        f" at step 5 (10x that of guessing uniformly or more: diverged); the last good checkpoint is {last} (step 4); "
        "resume it with a smaller learning rate: "
        f"{command_line('train.py', f'ckpt_path={last}', f'model.lr={cfg.model.lr / 10:g}')} (or set "
        "trainer.gradient_clip_val)"
    )
    assert checkpoint.load(last)["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")) == []
    score = evaluate(compose_cfg("eval", [f"ckpt={last}"]))
    assert math.isfinite(score.bits_per_char) and score.bits_per_char < 10
    # and it can be resumed with a smaller learning rate, to the end
    resumed = tiny_cfg(tmp_path, data_dir, f"model.lr={cfg.model.lr / 10}")
    with open_dict(resumed):
        resumed.ckpt_path = str(last)
    metrics, objects = train(resumed)
    assert objects.trainer.global_step == 20 and math.isfinite(metrics["val/bpc"])


def test_a_run_that_diverges_before_any_good_checkpoint_says_none_exists(tmp_path, data_dir):
    every_step = "callbacks.last_checkpoint.every_n_train_steps=1"
    done = run_cli("train.py", *RUN, "trainer.max_steps=30", "model.lr=1e6", every_step,
                   f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={data_dir}", cwd=tmp_path)  # fmt: skip
    line = one_line_error(done)
    assert "this run has no checkpoint whose weights gave a sane loss, so none is kept; start again with a smaller " \
           "learning rate (e.g. model.lr=100000)" in line and "checkpoint is" not in line, line  # fmt: skip
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_a_large_learning_rate_keeps_nothing_that_scores_inf(tmp_path, data_dir):
    """model.lr=1e6 as users type it, with the default checkpoint frequency: whatever is left evaluates finite."""
    done = run_cli("train.py", *RUN, "trainer.max_steps=30", "model.lr=1e6", f"hydra.run.dir={tmp_path / 'run'}",
                   f"paths.data_dir={data_dir}", cwd=tmp_path)  # fmt: skip
    line = one_line_error(done)
    assert line.startswith("error: training loss became ") and "diverged" in line, line
    for ckpt in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        score = evaluate(compose_cfg("eval", [f"ckpt={ckpt}"]))
        assert math.isfinite(score.bits_per_char), ckpt
    shutil.rmtree(tmp_path / "run")
