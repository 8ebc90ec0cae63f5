"""Ctrl-C / SIGTERM save last.ckpt and stop with one line; kill -9 loses at most the work since the last periodic
checkpoint; no checkpoint file is ever half-written; a non-finite loss stops the run and keeps the last good one."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from charlstm.app.cli import command_line
from charlstm.app.reliability import AtomicCheckpointIO, atomic_write, remove_stale_temporaries
from charlstm.app.resume import epochs_done
from charlstm.app.train import train
from charlstm.core import checkpoint
from charlstm.core.errors import DivergenceError, TrainingInterrupted
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^interrupted: (SIGINT|SIGTERM) at epoch (\d+), step (\d+): saved (\S+last\.ckpt); "
    r"resume with: \S+python\S* \S*train\.py ckpt_path=(\S+last\.ckpt)$"
)


class SendSignal(pl.Callback):
    """Sends ``signum`` to this process after optimizer step ``step`` (``times`` times in a row)."""

    def __init__(self, step: int, signum: int, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class PoisonWeights(pl.Callback):
    """Fills the first LSTM weight with NaN after optimizer step ``step``, as a diverging run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net.lstm.weight_ih_l0.fill_(float("nan"))


def add_callback(cfg, name: str, target: type, **kwargs) -> None:
    with open_dict(cfg):
        cfg.callbacks[name] = {"_target_": f"{target.__module__}.{target.__qualname__}", **kwargs}


def step_of(path: Path) -> int:
    return int(checkpoint.load(path)["global_step"])


# -- in-process: the save-and-stop path --------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_mid_epoch_saves_last_and_stops(make_cfg, tmp_path, signum):
    cfg = make_cfg("trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=5", "sample.length=0")
    add_callback(cfg, "send_signal", SendSignal, step=7, signum=int(signum))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    name = signal.Signals(signum).name
    resume = command_line("train.py", f"ckpt_path={last}")
    assert str(info.value) == f"{name} at epoch 0, step 7: saved {last}; resume with: {resume}"
    assert info.value.exit_code == 128 + signum
    assert step_of(last) == 7  # the batch in flight finished and is in the checkpoint
    assert {s: signal.getsignal(s) for s in before} == before  # handlers given back


def test_a_finished_run_gives_the_signal_handlers_back(make_cfg):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _, objects = train(make_cfg("sample.length=0", "data.max_chars=2000"))
    assert {s: signal.getsignal(s) for s in before} == before
    assert isinstance(objects.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # every file, best-* too


def test_second_ctrl_c_quits_without_saving(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=5", "sample.length=0")
    add_callback(cfg, "send_signal", SendSignal, step=7, signum=int(signal.SIGINT), times=2)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert str(info.value) == (
        f"SIGINT at step 7: stopped without saving; the newest checkpoint is {last} (step 5); "
        f"resume with: {command_line('train.py', f'ckpt_path={last}')}"
    )
    assert info.value.exit_code == 130
    assert step_of(last) == 5


# -- divergence -----------------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=3", "sample.length=0")
    add_callback(cfg, "poison", PoisonWeights, step=7)
    with pytest.raises(DivergenceError) as info:
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert str(info.value) == (
        f"training loss became nan at step 7; the last good checkpoint is {last} (step 6); resume it with a smaller "
        f"learning rate: {command_line('train.py', f'ckpt_path={last}', f'model.lr={cfg.model.lr / 10:g}')} (or set "
        "trainer.gradient_clip_val)"
    )
    ckpt = checkpoint.load(last)
    assert ckpt["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.dim() > 0)


def test_nonfinite_weights_are_never_written_over_a_good_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=3", "sample.length=0")
    add_callback(cfg, "poison", PoisonWeights, step=6)  # poisoned right before the step-6 save
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(DivergenceError) as info:
        train(cfg)
    assert str(info.value) == (
        f"the weights became non-finite (net.lstm.weight_ih_l0) by step 6, so {last} was not written; the last "
        f"good checkpoint is {last} (step 3); resume it with a smaller learning rate: "
        f"{command_line('train.py', f'ckpt_path={last}', f'model.lr={cfg.model.lr / 10:g}')} (or set "
        "trainer.gradient_clip_val)"
    )
    assert step_of(last) == 3


def test_checkpoint_io_refuses_nan_but_allows_an_infinite_best_so_far(tmp_path):
    io = AtomicCheckpointIO()
    good = {"state_dict": {"w": torch.ones(3), "best_val_loss": torch.tensor(float("inf"))}, "global_step": 1}
    io.save_checkpoint(good, tmp_path / "a.ckpt")
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["global_step"] == 1
    for bad in (torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")]), torch.tensor(float("nan"))):
        with pytest.raises(DivergenceError, match=r"^the weights became non-finite \(w\) by step 2, so "):
            io.save_checkpoint({"state_dict": {"w": bad}, "global_step": 2}, tmp_path / "a.ckpt")
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["global_step"] == 1


# -- atomic writes ------------------------------------------------------------------------------------------


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")

    def half_then_crash(fh):
        fh.write(b"new but incompl")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    for name in (".last.ckpt.abc123.tmp", "last.ckpt", "best-epoch001.ckpt", ".hidden.tmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".last.ckpt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", "best-epoch001.ckpt", "last.ckpt", "notes.txt"]


WRITER = textwrap.dedent(
    """
    import hashlib, itertools, os, sys
    from charlstm.app.reliability import atomic_write
    target = sys.argv[1]
    for k in itertools.count():
        payload = os.urandom(4 << 20)  # 4 MiB: the kill almost always lands inside a write
        atomic_write(target, lambda fh: fh.write(hashlib.sha256(payload).digest() + payload))
    """
)


@pytest.mark.slow
def test_kill_9_during_writes_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    try:
        deadline = time.monotonic() + 60
        while not target.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        for _ in range(5):  # several kills' worth of moments: check the file between rewrites
            time.sleep(random.uniform(0.05, 0.2))
            data = target.read_bytes()
            assert hashlib.sha256(data[32:]).digest() == data[:32]
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    data = target.read_bytes()
    assert len(data) == 32 + (4 << 20)
    assert hashlib.sha256(data[32:]).digest() == data[:32]
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# -- real processes: SIGTERM and kill -9 ------------------------------------------------------------------------


def start_training(tmp_path: Path, data_dir: Path, *overrides: str) -> subprocess.Popen:
    """``python train.py`` on a tiny slice for many epochs; its output goes to files (a full pipe would block it)."""
    cmd = [
        sys.executable, str(ROOT / "train.py"), *TINY, "trainer.max_epochs=1000", "trainer.enable_progress_bar=false",
        "sample.length=0", "callbacks.early_stopping=null", f"paths.outputs_root={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={data_dir}", *overrides,
    ]  # fmt: skip
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
    out.close()
    err.close()
    return proc


def stderr_of(tmp_path: Path) -> str:
    return (tmp_path / "stderr.txt").read_text()


def wait_for_checkpoint(proc: subprocess.Popen, last: Path, newer_than: int = -1, timeout: float = 60) -> int:
    """Wait until ``last`` holds a step beyond ``newer_than``; returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}:\n{stderr_of(last.parents[2])[-3000:]}")
        if last.exists():
            step = step_of(last)
            if step > newer_than:
                return step
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no periodic checkpoint appeared in time")


def resume_cfg(make_cfg, ckpt_path: Path, max_epochs: int):
    return make_cfg(f"trainer.max_epochs={max_epochs}", f"ckpt_path={ckpt_path}", "sample.length=0",
                    "callbacks.early_stopping=null")  # fmt: skip


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_with_one_line(tmp_path, data_dir, make_cfg):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = start_training(tmp_path, data_dir, "callbacks.last_checkpoint.every_n_train_steps=10")
    try:
        periodic = wait_for_checkpoint(proc, last)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr_of(tmp_path)
    assert proc.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith(("interrupted:", "error:"))] == [lines[-1]]
    match = LINE.match(lines[-1])
    assert match, lines[-1]
    name, epoch, step, saved, resume = match.groups()
    assert name == "SIGTERM" and Path(saved) == last and Path(resume) == last
    assert step_of(last) == int(step) >= periodic
    torch.load(last, map_location="cpu", weights_only=True)

    # the run goes on from that step, in the same folder
    _metrics, objects = train(resume_cfg(make_cfg, last, int(epoch) + 1))
    trainer = objects.trainer
    assert trainer.current_epoch == int(epoch) + 1
    assert trainer.global_step == (int(epoch) + 1) * trainer.num_training_batches
    assert objects.output_dir == tmp_path / "run"


@pytest.mark.slow
def test_kill_9_loses_at_most_the_steps_since_the_last_periodic_checkpoint(tmp_path, data_dir, make_cfg):
    ckpts = tmp_path / "run" / "checkpoints"
    proc = start_training(tmp_path, data_dir, "callbacks.last_checkpoint.every_n_train_steps=4")
    try:
        first = wait_for_checkpoint(proc, ckpts / "last.ckpt")
        wait_for_checkpoint(proc, ckpts / "last.ckpt", newer_than=first)  # rewritten at least once
        time.sleep(random.uniform(0.0, 0.3))
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    files = sorted(ckpts.glob("*.ckpt"))
    assert files, "no checkpoint survived"
    for path in files:  # every checkpoint file is whole: none half-written
        torch.load(path, map_location="cpu", weights_only=True)
        checkpoint.load(path)
    ckpt = checkpoint.load(ckpts / "last.ckpt")
    step = ckpt["global_step"]
    assert step > first

    _metrics, objects = train(resume_cfg(make_cfg, Path("last"), epochs_done(ckpt) + 1))
    trainer = objects.trainer
    assert step % 4 == 0 or step % trainer.num_training_batches == 0  # a periodic save or an epoch end
    assert trainer.global_step == trainer.current_epoch * trainer.num_training_batches > step
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]  # leftovers of the killed write cleared


@pytest.mark.parametrize(("module", "work", "what"), [("generate", "generate", "generation"),
                                                     ("evaluate", "evaluate", "evaluation")])  # fmt: skip
def test_ctrl_c_while_generating_or_scoring_is_one_line_and_exit_130(monkeypatch, capsys, module, work, what):
    import importlib

    from omegaconf import OmegaConf

    command = importlib.import_module(f"charlstm.app.{module}")

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, work, pressed)
    with pytest.raises(SystemExit) as stopped:
        command.run(OmegaConf.create({}))
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip() == f"interrupted: {what} stopped by Ctrl-C"
