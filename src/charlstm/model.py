"""CharLSTM (a plain nn.Module) and CharLSTMModule, the LightningModule that trains it."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from charlstm.data import ENCODINGS, LAYOUTS
from charlstm.errors import ConfigError, DivergenceError

State = tuple[torch.Tensor, torch.Tensor]
LN2 = math.log(2.0)


class CharLSTM(nn.Module):
    """Input layer for the encoding -> stacked nn.LSTM (dropout between layers) -> dropout -> linear logits.

    Dropout sits on the input (``input_dropout``), between LSTM layers (``dropout``) and after the last one
    (``output_dropout``, default: the same as ``dropout``).

    With ``encoding='normalized'``, ``layers=2``, ``dropout=0.2`` this is the tutorial's
    LSTM -> Dropout -> LSTM -> Dropout -> Dense; the softmax lives in the loss (cross-entropy on logits).
    """

    def __init__(
        self,
        vocab_size: int,
        units: int = 300,
        layers: int = 2,
        dropout: float = 0.2,
        encoding: str = "normalized",
        embed_dim: int = 64,
        input_dropout: float = 0.0,
        output_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if encoding not in ENCODINGS:
            raise ConfigError(f"model.encoding={encoding!r} is not allowed; use one of {', '.join(ENCODINGS)}")
        self.vocab_size, self.units, self.layers, self.encoding = vocab_size, units, layers, encoding
        self.embed = nn.Embedding(vocab_size, embed_dim) if encoding == "embedding" else None
        input_size = {"normalized": 1, "onehot": vocab_size, "embedding": embed_dim}[encoding]
        self.input_drop = nn.Dropout(input_dropout)
        self.lstm = nn.LSTM(input_size, units, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                            batch_first=True)  # fmt: skip
        self.drop = nn.Dropout(dropout if output_dropout is None else output_dropout)
        self.head = nn.Linear(units, vocab_size)

    def forward(
        self, x: torch.Tensor, state: State | None = None, last_only: bool = False
    ) -> tuple[torch.Tensor, State]:
        """Logits (B, T, V) — or (B, V) for the last position only — and the final (h, c)."""
        if self.embed is not None:
            x = self.embed(x)
        out, state = self.lstm(self.input_drop(x), state)
        if last_only:
            out = out[:, -1]
        return self.head(self.drop(out)), state


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
        min_lr_ratio: float = 0.0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 2,
        seq_len: int = 50,
        layout: str = "windows",
        lowercase: bool = True,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "adamw"):
            raise ConfigError(f"model.optimizer={optimizer!r} is not allowed; use 'adam' or 'adamw'")
        if scheduler not in ("none", "plateau", "cosine"):
            raise ConfigError(f"model.scheduler={scheduler!r} is not allowed; use 'none', 'plateau' or 'cosine'")
        if layout not in LAYOUTS:
            raise ConfigError(f"layout={layout!r} is not allowed; use 'windows' or 'streams'")
        self.save_hyperparameters()
        self.net = CharLSTM(len(vocab), units, layers, dropout, encoding, embed_dim, input_dropout, output_dropout)
        self._train_state: State | None = None
        self.register_buffer("best_val_loss", torch.tensor(float("inf")))
        self._val_sum = torch.zeros(())
        self._val_count = torch.zeros(())

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
        diverged = not bool(torch.isfinite(loss))
        if self._trainer is not None and self._trainer.world_size > 1:
            # every rank must stop together, or the others wait in backward for the one that raised
            diverged = self._trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            raise DivergenceError(
                f"training loss became {loss.item()} at step {self.global_step}; the last good checkpoint is kept. "
                "Lower model.lr or set trainer.gradient_clip_val"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=y.numel())
        self.log("train/bpc", loss.detach() / LN2, on_step=True, on_epoch=True, batch_size=y.numel())
        return loss

    # -- validation: every char from the seq_len chars before it --------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits, _ = self.net(x, last_only=y.dim() == 1)
        self._val_sum += self.loss_sum(logits, y).double()
        self._val_count += y.numel()

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        loss = (total / count.clamp(min=1)).float()
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
        opt_cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        opt = opt_cls(groups, lr=hp.lr)
        if hp.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=hp.plateau_factor, patience=hp.plateau_patience
            )
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"},
            }
        if hp.scheduler == "cosine" or hp.warmup_steps > 0:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warmup, floor, cosine = hp.warmup_steps, hp.min_lr_ratio, hp.scheduler == "cosine"
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup, floor, cosine))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def lr_factor(step: int, total: int, warmup: int, floor: float, cosine: bool) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to ``floor`` x lr at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
