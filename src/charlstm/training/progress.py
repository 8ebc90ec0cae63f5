"""What a running training shows: the progress bar, a line per validation in train.log (and on the console
when there is no live bar), and one validation at the very end so every run reports val/bpc."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, RichProgressBar

log = logging.getLogger("charlstm.app.train")


class RichBar(RichProgressBar):
    """Lightning's rich bar, showing ``Epoch N`` alone when the run has no epoch limit (not ``Epoch 0/-2``)."""

    # Lightning's protected hook for this text, the one place it is made: no public hook sets it, and changing it
    # after on_train_epoch_start would show Lightning's text for a frame first (tests/test_console.py fails if the
    # hook is renamed)
    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs is not None and max_epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text


class ModelLine(Callback):
    """One line when training starts, in place of Lightning's model summary table (``trainer.enable_model_summary``):
    the network's layers, its parameters and their size, the precision, and the processes a DDP run trains in.
    Lightning's table has one row for this model and a FLOPs column it cannot measure for it (always 0)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        hp = pl_module.hparams
        params = list(pl_module.parameters())
        total = sum(p.numel() for p in params)
        frozen = total - sum(p.numel() for p in params if p.requires_grad)
        size = sum(p.numel() * p.element_size() for p in params)
        size_text = f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.1f} KB"
        line = (
            f"model: {hp.get('layers')} x {hp.get('units')} LSTM ({hp.get('encoding')} input, "
            f"{len(hp.get('vocab', []))} chars), {total:,} parameters ({size_text}"
            f"{f', {frozen:,} frozen' if frozen else ''}), precision {trainer.precision}"
        )
        if trainer.world_size > 1:
            line += f", {trainer.world_size} processes ({type(trainer.strategy).__name__})"
        log.info(line)


def _fmt(metrics: dict[str, Any], key: str, digits: int = 4) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{float(value):.{digits}f}"


class ValidationLog(Callback):
    """One line per validation: step, epoch, val/bpc (and the best so far), val/loss, train/loss.

    Always in train.log; on the console only when no progress bar is shown (logs and scripts), since the bar
    already carries val/bpc. ``history`` keeps (step, val/bpc) of each validation, for the run's result.json; it
    travels in the checkpoints, so a resumed run's history starts with the validations before it.
    """

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        if "val/bpc" not in m:
            return
        self.history.append((trainer.global_step, float(m["val/bpc"])))
        bar = trainer.progress_bar_callback is not None
        log.info(
            "validation at step %d (epoch %d): val/bpc %s (best %s), val/loss %s nats/char, train/loss %s",
            trainer.global_step, trainer.current_epoch, _fmt(m, "val/bpc"), _fmt(m, "val/bpc_best"),
            _fmt(m, "val/loss"), _fmt(m, "train/loss", 3),
            extra={"file_only": bar},
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(p) for p in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), float(bpc)) for step, bpc in state_dict.get("history", [])]


class FinalValidation(Callback):
    """Validates on the run's last training batch when no validation is due there, whatever ends the run
    (``max_steps``, ``max_epochs``, ``limit_train_batches``; ``max_time`` already validates when it stops), so
    val/bpc is always reported, early stopping has its metric and the best checkpoint exists.

    Lightning runs a validation after any batch at which ``trainer.should_stop`` is set; this sets it on the
    batch that ends the run anyway.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.should_stop or not trainer.enable_validation:
            return
        if is_last_batch_of_run(trainer):
            trainer.should_stop = True


def is_last_batch_of_run(trainer: pl.Trainer) -> bool:
    """Whether the batch just trained is the last one the run will train."""
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps > 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0 or trainer.current_epoch + 1 < max_epochs:
        return False
    epoch_loop = trainer.fit_loop.epoch_loop
    total = trainer.num_training_batches
    ready = epoch_loop.batch_progress.current.ready
    return bool(epoch_loop.batch_progress.is_last_batch) or (not math.isinf(total) and ready >= total)
