"""The one line a run stopped while training ends with: interrupted, failed or diverged, and where its last good
checkpoint is."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from charlstm.app.build import TrainingRun
from charlstm.app.cli import command_line
from charlstm.app.reliability import LastCheckpoint
from charlstm.core.errors import CharLSTMError, DivergenceError, TrainingFailed, TrainingInterrupted

# The log lines of a run come from the training command's logger, wherever they are written.
log = logging.getLogger("charlstm.app.train")


def reached(err: CharLSTMError, run: TrainingRun) -> CharLSTMError:
    """``err`` carrying the run (``err.training_run``), so that the ``result.json`` of a run stopped by it keeps the
    steps, metrics and validation curve the run had reached."""
    err.training_run = run
    return err


def _saved(last: LastCheckpoint, what: str, none: str) -> str:
    """Where the run's last checkpoint is and the command that resumes it, or ``none``."""
    if last.last_saved_step is None:
        return none
    return f"{what} {last.path} (step {last.last_saved_step}); resume with: " \
           f"{command_line('train.py', f'ckpt_path={last.path}')}"  # fmt: skip


def interrupted_error(exc: BaseException, trainer: pl.Trainer, last: LastCheckpoint) -> TrainingInterrupted:
    """The line for a stop that happened outside the save-and-stop path (before training, or a 2nd Ctrl-C)."""
    signum = signal.SIGTERM if isinstance(exc, SIGTERMException) else signal.SIGINT
    saved = _saved(last, "the newest checkpoint is", "no checkpoint was written by this run")
    return TrainingInterrupted(
        f"{signal.Signals(signum).name} at step {trainer.global_step}: stopped without saving; {saved}", signum
    )


def failed_error(exc: BaseException, trainer: pl.Trainer, last: LastCheckpoint, out: Path) -> TrainingFailed:
    """The one line for an unexpected exception during training; the traceback goes to train.log."""
    log.error("training failed at step %d", trainer.global_step, exc_info=exc, extra={"file_only": True})
    what = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    saved = _saved(last, "the last good state is", "no checkpoint was written")
    logfile = out / "train.log"
    where = f" (traceback in {logfile})" if logfile.is_file() else ""
    return TrainingFailed(f"training stopped at step {trainer.global_step} by {what}; {saved}{where}")


def diverged_error(exc: DivergenceError, last: LastCheckpoint, lr: float) -> DivergenceError:
    """The line for a diverged run: what went non-finite, the good checkpoint there is (weights that gave a finite
    loss) or that there is none, and how to go on with a smaller learning rate."""
    what = str(exc).split("; ")[0]  # the model's or the checkpoint writer's first clause: what became non-finite
    kept = last.kept()
    if kept is None:
        return DivergenceError(
            f"{what}; this run has no checkpoint whose weights gave a sane loss, so none is kept; start again with a "
            f"smaller learning rate (e.g. model.lr={lr / 10:g}) or set trainer.gradient_clip_val"
        )
    path, step = kept
    at = f" (step {step})" if step is not None else ""
    return DivergenceError(
        f"{what}; the last good checkpoint is {path}{at}; resume it with a smaller learning rate: "
        f"{command_line('train.py', f'ckpt_path={path}', f'model.lr={lr / 10:g}')} (or set trainer.gradient_clip_val)"
    )
