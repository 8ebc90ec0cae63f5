"""Nothing lost: checkpoint files written atomically, ``last.ckpt`` kept fresh (every N steps, every T seconds,
every epoch, at the end), and Ctrl-C / SIGTERM turned into a saved checkpoint and a clean stop."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn

from charlstm.app.cli import command_line
from charlstm.app.cluster import hand_over, requeue_signal
from charlstm.core.checkpoint import nonfinite_tensor
from charlstm.core.errors import CharLSTMError, DivergenceError, TrainingInterrupted
from charlstm.core.fileio import TMP_SUFFIX, atomic_write

LAST = "last.ckpt"
# The previous last.ckpt, held (as a hard link: no copy) until the weights of the newer one give a sane loss.
HELD = f".{LAST}.held{TMP_SUFFIX}"


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file() and ".ckpt." in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made crash-safe, and refusing to overwrite good weights with NaN.

    Lightning's own writer buffers the file in memory and moves it from the system temp folder, which is a
    plain copy (so a partial file) when that folder is on another file system, and never fsyncs.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        bad = nonfinite_tensor(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise DivergenceError(
                f"the weights became non-finite ({bad}) by step {checkpoint.get('global_step')}, so {path} was "
                "not written; lower model.lr or set trainer.gradient_clip_val"
            )
        atomic_write(path, lambda fh: torch.save(checkpoint, fh))


def rng_state() -> dict[str, Any]:
    """Every random generator training draws from, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class LastCheckpoint(Checkpoint):
    """Keeps ``last.ckpt`` the newest resumable state of the run and stops cleanly on Ctrl-C / SIGTERM.

    ``last.ckpt`` is rewritten every ``every_n_train_steps`` optimizer steps and every ``train_time_interval``
    seconds (either may be null), at the end of every epoch (after validation, so best-metric tracking, early
    stopping and the learning-rate schedule are in it) and at the end of training; so ``kill -9`` loses at most
    the work since the last write.
    On the first Ctrl-C or SIGTERM the current batch finishes, ``last.ckpt`` is written and the run ends with
    :class:`TrainingInterrupted`; a second Ctrl-C quits at once without saving. In a job that submitit started,
    its requeue signal (SIGUSR2, sent before the time limit) does the same and then hands the signal to
    submitit, which requeues the job; the requeued job resumes from that ``last.ckpt``. With several processes
    (DDP) all ranks agree on when to save and stop, so a signal to any one of them stops all.

    The checkpoint also carries the random generators' states, so a run resumed from an epoch boundary
    draws the same shuffles and dropout masks as one that never stopped.

    A checkpoint is good once its weights have given a sane training loss (the next step's): until then the
    previous ``last.ckpt`` is held beside it (a hard link), and if that next loss is NaN, inf or blown up (a
    diverging run, see ``model.BLOWUP``) the previous one is put back, so ``last.ckpt`` is never weights that
    cannot be trained on. :meth:`kept` says what is there.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        every_n_train_steps: int | None = 500,
        train_time_interval: float | None = None,
        handle_signals: bool = True,
    ) -> None:
        super().__init__()
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_train_steps = every_n_train_steps or 0
        self.train_time_interval = float(train_time_interval) if train_time_interval else None
        self.handle_signals = handle_signals
        self.signal_received: int | None = None
        self.last_saved_step: int | None = None
        self._start_step = 0
        self._pending_plateau: list[tuple[int, float]] = []
        self._replay_plateau: list[tuple[int, float]] = []
        self._last_save_time = time.monotonic()
        self._previous_handlers: dict[int, Any] = {}
        self._requeue_signal: int | None = None
        self._is_global_zero = True
        self._stepping = False
        self._held_step: int | None = None  # the step of the previous last.ckpt held at HELD, if any
        self._unconfirmed = False  # last.ckpt's weights have given no training loss yet

    @property
    def path(self) -> Path:
        assert self.dirpath is not None, "LastCheckpoint.setup() sets dirpath"
        return self.dirpath / LAST

    @property
    def held(self) -> Path:
        assert self.dirpath is not None, "LastCheckpoint.setup() sets dirpath"
        return self.dirpath / HELD

    def kept(self) -> tuple[Path, int | None] | None:
        """The good ``last.ckpt`` there is (and its step, when this run wrote it), or None."""
        if not self.path.is_file() or self._unconfirmed:
            return None
        return self.path, self.last_saved_step

    # -- lifecycle --------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"
        self._is_global_zero = trainer.is_global_zero
        if stage == "fit" and trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.dirpath)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save_time = time.monotonic()
        self._start_step = trainer.global_step
        for index, value in self._replay_plateau:
            pl_module.lr_scheduler_step(trainer.lr_scheduler_configs[index].scheduler, torch.tensor(value))
        self._replay_plateau = []
        if trainer.received_sigterm:  # arrived while Lightning's own handler was in place
            self.signal_received = signal.SIGTERM
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            # Installed after Lightning's (registered just before training starts), which it replaces for the
            # run: Lightning's SIGTERM handler broadcasts from inside the handler, which can deadlock DDP.
            self._requeue_signal = requeue_signal()
            for signum in (*_SIGNALS, *([self._requeue_signal] if self._requeue_signal else [])):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal_received is not None:
            if signum == signal.SIGINT:
                self._restore_handlers()
                raise KeyboardInterrupt
            return
        self.signal_received = signum
        if self._is_global_zero:
            # os.write: print() is not safe inside a signal handler (the main thread may be mid-print).
            name = signal.Signals(signum).name
            again = " (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""
            if signum == self._requeue_signal:
                again = " and requeueing the job"
            os.write(sys.stderr.fileno(), f"\n{name}: finishing this batch, then saving {LAST}{again}\n".encode())

    def _restore_handlers(self) -> None:
        """Give the signals back to whoever had them (Lightning, which restores the originals at teardown)."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                if handler is not None and signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._stepping = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, DivergenceError):
            self._diverged(trainer)
            return
        self._release_held()
        # An unexpected exception outside the optimizer's update leaves the weights of the last finished step:
        # save them, so the run can be resumed from there. Never after a non-finite loss, an interruption (it
        # saved already, or was told not to), inside the update (half-applied) or with several processes (the
        # save is collective and the other ranks may be gone).
        if (
            isinstance(exception, Exception)
            and not isinstance(exception, CharLSTMError)
            and not self._stepping
            and trainer.world_size == 1
            and not self._should_skip(trainer)
            and trainer.global_step > self._start_step
            and trainer.global_step != self.last_saved_step
        ):
            with contextlib.suppress(Exception):  # the original failure is what the user must see
                self.save(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()
        self._release_held()

    # -- holding the previous checkpoint until the new one's weights give a finite loss -------------
    def _hold_previous(self) -> None:
        if not self._is_global_zero or not self.path.is_file():
            return
        if self._held_step is not None or self._unconfirmed:
            return  # already holding an older good one, or last.ckpt is itself unconfirmed: keep what is held
        self.held.unlink(missing_ok=True)
        try:
            os.link(self.path, self.held)
        except OSError:  # no hard links on this file system: nothing is held, a bad last.ckpt is removed instead
            return
        self._held_step = -1 if self.last_saved_step is None else self.last_saved_step

    def _release_held(self) -> None:
        """last.ckpt is good (or the run ended): the held previous one is no longer needed."""
        self._unconfirmed = False
        if self._held_step is not None and self._is_global_zero:
            self.held.unlink(missing_ok=True)
        self._held_step = None

    def _diverged(self, trainer: pl.Trainer) -> None:
        """A non-finite loss: a last.ckpt written after the last finite loss holds the weights that gave it."""
        if not (self._unconfirmed and self.last_saved_step == trainer.global_step):
            self._release_held()
            return
        if self._is_global_zero:
            if self._held_step is not None:
                os.replace(self.held, self.path)
            else:
                self.path.unlink(missing_ok=True)
        self.last_saved_step = None if self._held_step in (None, -1) else self._held_step
        self._held_step, self._unconfirmed = None, False

    # -- saving -----------------------------------------------------------------------------------
    def _should_skip(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING

    def save(self, trainer: pl.Trainer) -> Path:
        """Write ``last.ckpt`` now (every rank must call this: the save is collective under DDP)."""
        self._hold_previous()
        try:
            trainer.save_checkpoint(self.path, weights_only=False)
        except BaseException:
            if not self._unconfirmed:
                self._release_held()  # last.ckpt is unchanged and good
            raise
        self._unconfirmed = True
        self.last_saved_step = trainer.global_step
        self._last_save_time = time.monotonic()
        return self.path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stepping = False
        if self._unconfirmed and trainer.global_step != self.last_saved_step:
            self._release_held()  # this batch's loss, from the weights last.ckpt holds, was finite
        if self._should_skip(trainer):
            return
        step = trainer.global_step
        stop = self.signal_received is not None
        due_time = (
            self.train_time_interval is not None and time.monotonic() - self._last_save_time >= self.train_time_interval
        )
        if trainer.world_size > 1:
            # One collective per batch: any rank's signal stops all (and any rank's requeue signal requeues);
            # rank 0's clock decides timed saves.
            requeue = stop and self.signal_received == self._requeue_signal
            flags = torch.tensor([float(stop) + float(requeue), float(due_time and trainer.is_global_zero)],
                                 device=trainer.strategy.root_device)  # fmt: skip
            flags = trainer.strategy.reduce(flags, reduce_op="max")
            kind, due_time = int(flags[0].item()), bool(flags[1].item())
            stop = kind > 0
            if kind == 2 and self._requeue_signal is not None:
                self.signal_received = self._requeue_signal
            elif stop and self.signal_received is None:
                self.signal_received = signal.SIGTERM
        due_steps = self.every_n_train_steps > 0 and step % self.every_n_train_steps == 0
        if stop:
            self._stop(trainer)
        if (due_steps or due_time) and step != self.last_saved_step:
            self.save(trainer)

    def _stop(self, trainer: pl.Trainer) -> None:
        signum = self.signal_received or signal.SIGINT
        path = self.save(trainer)
        name = signal.Signals(signum).name
        if signum == self._requeue_signal:
            note, code = hand_over(self._previous_handlers.get(signum), signum, path)
            raise TrainingInterrupted(
                f"{name} at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {path}; {note}",
                signum, code,
            )  # fmt: skip
        raise TrainingInterrupted(
            f"{name} at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {path}; "
            f"resume with: {command_line('train.py', f'ckpt_path={path}')}",
            signum,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after validation and after the other callbacks (Lightning orders checkpoint callbacks last), so
        # the file holds this epoch's best-metric and early-stopping state. On a resume Lightning replays this
        # hook for the restored epoch before any new step: nothing new to save then.
        if self._should_skip(trainer) or trainer.global_step == self._start_step:
            return
        self._pending_plateau = pending_plateau_steps(trainer)
        try:
            self.save(trainer)
        finally:
            self._pending_plateau = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before Lightning's teardown, which puts back the handlers it found when training began.
        self._restore_handlers()
        # After the last epoch's scheduler step: the state a longer run continues from.
        if not self._should_skip(trainer):
            self.save(trainer)

    # -- what travels in the checkpoint -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(), "plateau": list(self._pending_plateau)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            set_rng_state(state_dict["rng"])
        self._replay_plateau = list(state_dict.get("plateau", []))


def pending_plateau_steps(trainer: pl.Trainer) -> list[tuple[int, float]]:
    """The ReduceLROnPlateau steps Lightning takes right after ``on_train_epoch_end`` (index, metric value).

    Lightning does not replay them when it resumes from a checkpoint written in that hook, so they travel in
    the checkpoint and :class:`LastCheckpoint` takes them when the resumed run starts.
    """
    # Lightning steps them only when the epoch ran to its last batch (not when max_steps or a stop ended it early),
    # told by the epoch loop's public batch counters
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.current.ready != trainer.num_training_batches and not progress.is_last_batch:
        return []
    steps = []
    for i, config in enumerate(trainer.lr_scheduler_configs):
        value = trainer.callback_metrics.get(config.monitor) if config.monitor else None
        if (
            config.reduce_on_plateau
            and config.interval == "epoch"
            and (trainer.current_epoch + 1) % config.frequency == 0
            and value is not None
        ):
            steps.append((i, float(value)))
    return steps


def ensure_last_checkpoint(callbacks: list[Any], dirpath: str | os.PathLike[str]) -> LastCheckpoint:
    """The run's LastCheckpoint: the configured one, or one with the defaults added to ``callbacks``."""
    for cb in callbacks:
        if isinstance(cb, LastCheckpoint):
            return cb
    cb = LastCheckpoint(dirpath)
    callbacks.append(cb)
    return cb
