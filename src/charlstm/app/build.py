"""A run's Lightning objects built from its config: the callbacks, the loggers and the trainer, held together with
the data and the model as a :class:`TrainingRun`."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Checkpoint, LearningRateMonitor, ProgressBar

from charlstm.app import cluster
from charlstm.app.hydrajob import command_line_keys
from charlstm.app.reliability import AtomicCheckpointIO, LastCheckpoint, ensure_last_checkpoint
from charlstm.core.errors import CharLSTMError
from charlstm.core.hardware import check_fits
from charlstm.core.net import sequence_bytes
from charlstm.training.callbacks import ConfigHParams, NewLearningRate
from charlstm.training.progress import FinalValidation, ModelLine, ValidationLog

# The log lines of a run come from the training command's logger, wherever they are written.
log = logging.getLogger("charlstm.app.train")


@dataclass
class TrainingRun:
    """What ``train()`` built: the config it trained with, the data, the model, the trainer with its callbacks and
    loggers, the run folder, and the callback that says which checkpoint is the newest."""

    cfg: DictConfig
    datamodule: Any
    model: pl.LightningModule
    trainer: pl.Trainer
    callbacks: list[Any]
    loggers: list[Any]
    output_dir: Path
    last: LastCheckpoint


def instantiate_named(group: DictConfig | None) -> list[Any]:
    """Instantiate each ``_target_`` entry of a named dict (callbacks, loggers); null entries are skipped."""
    if not group:
        return []
    built = []
    for node in group.values():
        if isinstance(node, DictConfig) and "_target_" in node:
            try:
                built.append(instantiate(node))
            except InstantiationException as err:
                # Hydra wraps what the constructor raised; our own errors keep their one line.
                if isinstance(err.__cause__, CharLSTMError):
                    raise err.__cause__ from None
                raise
    return built


def instantiate_loggers(group: DictConfig | None, purge_step: int | None) -> list[Any]:
    """The configured loggers; a resumed TensorBoard log hides the steps the interrupted run logged after
    its checkpoint (``purge_step``), so the curves continue without a zig-zag."""
    loggers = []
    for node in (group or {}).values():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        if purge_step is not None and str(node._target_).endswith("TensorBoardLogger"):
            loggers.append(instantiate(node, purge_step=purge_step))
        else:
            loggers.append(instantiate(node))
    return loggers


def progress_bar_shown(cfg: DictConfig) -> bool:
    """The live bar only where someone watches it: ``trainer.enable_progress_bar`` and a terminal on stdout. Piped
    into a file or a scheduler's log, a run prints one line per validation instead of the bar's redraws."""
    return bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stdout.isatty()


def check_batch_fits(cfg: DictConfig, net: Any) -> None:
    """data.batch_size against the memory of the device that trains, from the tensor sizes of one training step,
    before any folder holds more than its config (a batch too large fails at once, in one line naming the key)."""
    accelerator = str(cfg.trainer.accelerator)
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    precision = str(cfg.trainer.precision)  # resolved already (resolve_precision)
    elem = 2 if "16" in precision else 8 if "64" in precision else 4
    seq_len = int(cfg.data.seq_len)
    every_char = cfg.data.layout == "streams" or cfg.data.get("targets") == "all"
    per_item = sequence_bytes(net, seq_len, seq_len if every_char else 1, training=True, elem=elem)
    what = "stream chunk" if cfg.data.layout == "streams" else "window"
    check_fits("data.batch_size", int(cfg.data.batch_size), per_item, "cuda" if gpu else "cpu", what)


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any], **overrides: Any) -> pl.Trainer:
    plugins = [AtomicCheckpointIO(), *cluster.lightning_plugins(cfg.trainer)]
    # The DataModule gives every DDP rank its own share itself (training shuffles without a list of every window;
    # validation counts each window once), so Lightning must not swap in its DistributedSampler.
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                       use_distributed_sampler=False, **overrides)  # fmt: skip


def build_callbacks(
    cfg: DictConfig, out: Path, show_bar: bool, old_lr: float | None
) -> tuple[list[Any], LastCheckpoint]:
    """The configured callbacks and the project's own; the LastCheckpoint that keeps last.ckpt (one never attached
    when checkpointing is off: it only reports that nothing was saved). ``old_lr`` is a resumed run's learning
    rate."""
    callbacks = instantiate_named(cfg.get("callbacks"))
    if not show_bar:
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    callbacks += [FinalValidation(), ValidationLog()]
    if old_lr is not None and float(old_lr) != float(cfg.model.lr):  # e.g. a diverged run goes on with a smaller one
        log.info("resuming with model.lr=%g (the run had %g): the optimizer's learning rate is scaled by %g",
                 cfg.model.lr, old_lr, cfg.model.lr / old_lr)  # fmt: skip
        callbacks.append(NewLearningRate(float(old_lr), float(cfg.model.lr)))
    for cb in callbacks:
        if isinstance(cb, ConfigHParams):
            cb.config = cfg  # the whole run config goes into TensorBoard's HParams tab
            cb.command_keys = command_line_keys()
    if cfg.trainer.get("enable_checkpointing", True):
        return callbacks, ensure_last_checkpoint(callbacks, out / "checkpoints")
    callbacks = [cb for cb in callbacks if not isinstance(cb, Checkpoint)]
    return callbacks, LastCheckpoint(out / "checkpoints")


def build_run(cfg: DictConfig, datamodule: Any, model: pl.LightningModule, ckpt: dict[str, Any] | None) -> TrainingRun:
    """The callbacks, loggers and trainer of a run on ``datamodule`` and ``model``; ``ckpt`` is the checkpoint a
    resumed run goes on from (None for a new run)."""
    out = Path(cfg.paths.output_dir)
    show_bar = progress_bar_shown(cfg)
    old_lr = ckpt["hyper_parameters"].get("lr") if ckpt is not None else None
    callbacks, last = build_callbacks(cfg, out, show_bar, old_lr)
    step = int(ckpt["global_step"]) if ckpt is not None else 0
    # TensorBoard's points sit at the steps done: those after the checkpoint's step are the lost ones
    loggers = instantiate_loggers(cfg.get("logger"), purge_step=step + 1 if ckpt is not None else None)
    if not loggers:  # logger=none: nothing to monitor the learning rate into (Lightning would refuse to start)
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    if cfg.trainer.get("enable_model_summary", True):
        callbacks.append(ModelLine())  # the project's one line instead of Lightning's table
    trainer = build_trainer(cfg, callbacks, loggers, enable_progress_bar=show_bar, enable_model_summary=False)
    return TrainingRun(cfg, datamodule, model, trainer, callbacks, loggers, out, last)
