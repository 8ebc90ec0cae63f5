"""CharLSTMModule, the LightningModule that trains a CharLSTM (charlstm.core.net)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from charlstm.core.errors import ConfigError, DivergenceError
from charlstm.core.net import CharLSTM, State
from charlstm.training.datamodule import (
    STREAMS_KEY,
    fix_resume_point,
    own_stream_state,
    stream_states,
    trainer_of,
)

LN2 = math.log(2.0)
log = logging.getLogger(__name__)
# A training loss this many times that of guessing uniformly is a blow-up (char-rnn's "loss is exploding"): weights
# grown to ~1e35 give a finite but huge loss, and a checkpoint of them scores inf.
BLOWUP = 10.0
CLOCK_KEY = "charlstm_train_clock"  # where a checkpoint keeps the schedule's elapsed training seconds


class CharLSTMModule(pl.LightningModule):
    """Trains CharLSTM on windows (zero state per sample) or streams (state carried, truncated BPTT).

    Hyperparameters are primitives only (the vocabulary is a list of str), so checkpoints load with
    ``torch.load(weights_only=True)`` and carry everything generation needs.
    """

    def __init__(
        self,
        vocab: list[str],
        encoding: str = "normalized",
        units: int = 300,
        layers: int = 2,
        dropout: float = 0.2,
        input_dropout: float = 0.0,
        output_dropout: float | None = None,
        embed_dim: int = 64,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        warmup_steps: int = 0,
        warmup_fraction: float = 0.0,
        min_lr_ratio: float = 0.0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 2,
        seq_len: int = 50,
        layout: str = "windows",
        lowercase: bool = True,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = CharLSTM(len(vocab), units, layers, dropout, encoding, embed_dim, input_dropout, output_dropout)
        self._train_state: State | None = None
        self.register_buffer("best_val_loss", torch.tensor(float("inf")))
        self._val_sum = torch.zeros(())
        self._val_count = torch.zeros(())
        # training seconds (validation excluded): the run's one training time, and the time schedule's clock
        self.clock = TrainClock(None)

    def forward(self, x: torch.Tensor, state: State | None = None, last_only: bool = False):
        return self.net(x, state, last_only)

    @staticmethod
    def loss_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")

    # -- training ----------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._train_state = None  # streams restart at the top of the text each epoch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        last_only = y.dim() == 1
        state = self._train_state if self.hparams.layout == "streams" else None
        logits, state = self.net(x, state, last_only=last_only)
        if self.hparams.layout == "streams":
            # Truncated BPTT: carry the values, cut the graph at the batch boundary.
            self._train_state = (state[0].detach(), state[1].detach())
        loss = self.loss_sum(logits, y) / y.numel()
        value = float(loss.detach())
        diverged = not math.isfinite(value) or value > BLOWUP * math.log(max(2, len(self.hparams.vocab)))
        trainer = trainer_of(self)
        if trainer is not None and trainer.world_size > 1:
            # every rank must stop together, or the others wait in backward for the one that raised
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            raise DivergenceError(
                f"training loss became {value:.4g} at step {self.global_step}"
                + ("" if not math.isfinite(value) else f" ({BLOWUP:g}x that of guessing uniformly or more: diverged)")
                + "; lower model.lr or set trainer.gradient_clip_val"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=y.numel())
        self.log("train/bpc", loss.detach() / LN2, on_step=True, on_epoch=False, batch_size=y.numel())
        # Lightning's logging step for this batch's points (its own counts from 0): the steps done, as the console
        # counts them, so the validation after step 10 sits at 10 beside it (`step` is Lightning's x-axis metric)
        self.log("step", float(self.global_step + 1), on_step=True, on_epoch=False, batch_size=1)
        return loss

    def train_seconds(self) -> float:
        """The run's training time: seconds in training batches, validation excluded, summed over resumes. The
        console, TensorBoard's hp/train_seconds, result.json and a sweep's summary all report this."""
        return self.clock.elapsed()

    # -- validation: every char from the seq_len chars before it --------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits, _ = self.net(x, last_only=y.dim() == 1)
        self._val_sum += self.loss_sum(logits, y).double()
        self._val_count += y.numel()

    def _mean_loss(self) -> torch.Tensor:
        """Nats per char over every rank's share summed: each rank logs the whole text's numbers (no sync_dist)."""
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        return (total / count.clamp(min=1)).float()

    def on_validation_epoch_end(self) -> None:
        loss = self._mean_loss()
        if self.trainer.sanity_checking:
            return
        if loss < self.best_val_loss:
            self.best_val_loss.fill_(loss.item())
        self.log_dict(
            {
                "val/loss": loss,
                "val/ppl": torch.exp(loss),
                "val/loss_best": self.best_val_loss.clone(),
                "val/bpc_best": self.best_val_loss / LN2,
            },
            prog_bar=False,
        )
        self.log("val/bpc", loss / LN2, prog_bar=True)
        # at the steps done, the step the console prints (Lightning's own step is one less), with the epoch once
        # (a `step` given, Lightning adds none)
        self._log_axes(epoch=True)

    def _log_axes(self, epoch: bool) -> None:
        """``step`` (Lightning's x-axis metric) and ``epoch`` for the points logged with them; every rank has the
        same values (sync_dist: Lightning's mean of them, without its warning)."""
        axes = {"step": float(self.global_step)} | ({"epoch": float(self.current_epoch)} if epoch else {})
        self.log_dict(axes, sync_dist=True)

    # -- test: the held-out text (data.test_fraction), scored like validation, once, after training -------------
    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self._mean_loss()
        self.log_dict({"test/loss": loss, "test/bpc": loss / LN2, "test/ppl": torch.exp(loss)})
        self._log_axes(epoch=False)  # beside the last validation, without a second epoch point

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (no_decay if name.endswith("bias") or name.startswith("embed") else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[hp.optimizer]  # checked by app.config
        opt = opt_cls(groups, lr=hp.lr, **self._fused())
        if hp.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=hp.plateau_factor, patience=hp.plateau_patience
            )
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"},
            }
        if hp.scheduler == "cosine" or hp.warmup_steps > 0 or hp.warmup_fraction > 0:
            floor, cosine = hp.min_lr_ratio, hp.scheduler == "cosine"
            budget = self._time_budget()
            if budget is not None:
                # A time budget: warm-up and decay follow training seconds, so any machine ends at the floor.
                self.clock.set_budget(budget)
                # max_steps / max_epochs may still end the run first: the schedule follows whichever is nearer.
                total = float(self.trainer.estimated_stepping_batches)
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, self.clock.schedule(hp.warmup_fraction, floor, cosine, hp.warmup_steps, total)
                )
            else:
                if not math.isfinite(self.trainer.estimated_stepping_batches):
                    raise ConfigError(
                        f"model.scheduler={hp.scheduler} with warm-up or decay needs the run's length; set "
                        "trainer.max_time, trainer.max_steps or trainer.max_epochs"
                    )
                total = max(1, int(self.trainer.estimated_stepping_batches))
                warmup = hp.warmup_steps or round(hp.warmup_fraction * total)
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda step: lr_factor(step, total, warmup, floor, cosine)
                )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

    def _grad_scaler(self) -> Any:
        trainer = trainer_of(self)
        plugin = trainer.precision_plugin if trainer is not None else None
        return getattr(plugin, "scaler", None)

    def _fused(self) -> dict[str, bool]:
        """The fused Adam/AdamW (one kernel for all tensors) where torch has it for the parameters' device: on a CPU
        ~10x faster than the per-tensor loop, a sixth of a bf16 step at the default sizes. Not with fp16's grad
        scaler, which must unscale the gradients before they are clipped."""
        devices = {p.device.type for p in self.parameters()}
        fused = self._grad_scaler() is None and devices <= {"cpu", "cuda"}
        return {"fused": True} if fused else {}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        """``trainer.gradient_clip_val`` as Lightning clips, also for the fused optimizer under bf16-mixed: Lightning's
        mixed-precision plugin refuses any fused optimizer, though without a grad scaler there is nothing to unscale."""
        fused = any(group.get("fused") for group in optimizer.param_groups)
        if not gradient_clip_val or not fused or self._grad_scaler() is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def _timer(self) -> Any:
        """Lightning's Timer callback (``trainer.max_time`` adds it), or None."""
        from pytorch_lightning.callbacks import Timer

        return next((cb for cb in self.trainer.callbacks if isinstance(cb, Timer)), None)

    def _time_budget(self) -> float | None:
        """Seconds of ``trainer.max_time`` (None when the run is bounded by steps or epochs only)."""
        timer = self._timer()
        if timer is None or timer.time_remaining() is None:
            return None
        return timer.time_elapsed() + timer.time_remaining()

    # -- the time schedule's clock: a training stretch starts at a batch, validation pauses it ------------------
    def on_validation_start(self) -> None:
        self.clock.pause()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.clock.running:
            timer = self._timer()
            self.clock.resume_training(None if timer is None else timer.time_elapsed())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLOCK_KEY] = self.clock.state_dict()
        if self._train_state is not None:  # streams: a resume inside the epoch carries on every rank's state
            checkpoint[STREAMS_KEY] = stream_states(self, self._train_state)
        fix_resume_point(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CLOCK_KEY in checkpoint:
            self.clock.load_state_dict(checkpoint[CLOCK_KEY])
        # Used only when the run resumes inside an epoch: a new epoch starts from zeros (on_train_epoch_start)
        self._train_state = own_stream_state(self, checkpoint.get(STREAMS_KEY))

    def on_train_start(self) -> None:
        if self._train_state is not None:  # restored before the model moved to its device
            self._train_state = (self._train_state[0].to(self.device), self._train_state[1].to(self.device))

    def on_train_end(self) -> None:
        self.clock.pause()
        opt = self.optimizers(use_pl_optimizer=False) if trainer_of(self) is not None else None
        if isinstance(opt, torch.optim.Optimizer) and self.trainer.is_global_zero:
            lr = opt.param_groups[0]["lr"]
            log.info("learning rate at the end: %.3g (%.3f x its peak %.3g) after %.1f s of training (validation "
                     "excluded)", lr, lr / self.hparams.lr, self.hparams.lr, self.train_seconds())  # fmt: skip


def lr_factor(step: int, total: int, warmup: int, floor: float, cosine: bool) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to ``floor`` x lr at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainClock:
    """Training seconds (validation excluded) and, with a time budget, the schedule's progress through it.

    Every run has one: its training time is the seconds from the start of a training batch to the next validation
    (or the end of training), summed. The budget is wall time (Lightning's ``max_time`` counts validation too), so
    the training seconds it will hold are projected from the share of wall time spent training so far: ``horizon =
    budget x train / wall``, re-estimated whenever training resumes (after each validation). The learning rate then
    depends on training seconds only: a validation pause does not move it, and the run ends with progress 1,
    annealed at the floor.
    """

    def __init__(self, budget: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget, self.clock = budget, clock
        self.train_s = 0.0  # training seconds before the current stretch (restored on resume)
        self.horizon = budget if budget is not None else math.inf  # training seconds the budget is expected to hold
        self._since: float | None = None

    def set_budget(self, budget: float) -> None:
        """The run's time budget (``trainer.max_time``); a clock restored from a run without one starts its horizon
        at the budget."""
        self.budget = budget
        if not math.isfinite(self.horizon):
            self.horizon = budget

    @property
    def running(self) -> bool:
        return self._since is not None

    def elapsed(self) -> float:
        """Training seconds so far, the current stretch included."""
        return self.train_s + (self.clock() - self._since if self._since is not None else 0.0)

    def pause(self) -> None:
        if self._since is not None:
            self.train_s += self.clock() - self._since
            self._since = None

    def resume_training(self, wall_elapsed: float | None = None) -> None:
        """Start a training stretch; ``wall_elapsed`` (the budget's wall seconds so far) refines the horizon."""
        if self.budget is not None and wall_elapsed is not None and wall_elapsed > 0 and self.train_s > 0:
            self.horizon = self.budget * min(1.0, self.train_s / wall_elapsed)
        if self._since is None:
            self._since = self.clock()

    def progress(self) -> float:
        return min(1.0, self.elapsed() / max(self.horizon, 1e-9))

    def factor(
        self,
        warmup_fraction: float,
        floor: float,
        cosine: bool,
        step: int = 0,
        warmup_steps: int = 0,
        total_steps: float = math.inf,
    ) -> float:
        """The learning-rate factor now: linear warm-up over ``warmup_fraction`` of the horizon, then (cosine) decay
        to ``floor`` at its end; ``warmup_steps`` (a recipe without a fraction) ramps the first optimizer steps.
        When a step limit (``total_steps``) would end the run before the budget, progress follows the steps."""
        progress = self.progress()
        if math.isfinite(total_steps) and total_steps > 0:
            progress = max(progress, min(1.0, step / total_steps))
        ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps and not warmup_fraction else 1.0
        return ramp * time_factor(progress, warmup_fraction, floor, cosine)

    def schedule(
        self, warmup_fraction: float, floor: float, cosine: bool, warmup_steps: int = 0, total_steps: float = math.inf
    ) -> Callable[[int], float]:
        """The learning-rate factor of each optimizer step, for ``LambdaLR``: the clock is read once per step, so every
        parameter group (LambdaLR asks once per group) gets the same rate."""
        reading: dict[int, float] = {}

        def factor(step: int) -> float:
            if step not in reading:
                reading.clear()
                reading[step] = self.factor(warmup_fraction, floor, cosine, step, warmup_steps, total_steps)
            return reading[step]

        return factor

    def state_dict(self) -> dict[str, float]:
        return {"train_s": float(self.elapsed()), "horizon": float(self.horizon)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.train_s, self.horizon, self._since = float(state["train_s"]), float(state["horizon"]), None


def time_factor(progress: float, warmup: float, floor: float, cosine: bool) -> float:
    """Learning-rate factor at ``progress`` in [0, 1] of the run: linear warm-up over the first ``warmup`` of it,
    then constant or cosine decay from 1 to ``floor`` at progress 1."""
    if warmup and progress < warmup:
        return max(progress / warmup, 1e-3)
    if not cosine:
        return 1.0
    p = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
