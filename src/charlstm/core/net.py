"""The network and its input encodings: torch only, shared by training and generation (no Lightning here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlstm.core.errors import ConfigError

ENCODINGS = ("normalized", "onehot", "embedding")

State = tuple[torch.Tensor, torch.Tensor]


def encode_inputs(ids: torch.Tensor, encoding: str, vocab_size: int) -> torch.Tensor:
    """Model inputs for integer ids of shape (..., T). Shared by training, evaluation and generation.

    normalized: id / vocab_size as one float feature, shape (..., T, 1) (the tutorial's input);
    onehot: shape (..., T, vocab_size); embedding: the int64 ids themselves, for the model's embedding layer.
    """
    if encoding == "normalized":
        return (ids.to(torch.float32) / vocab_size).unsqueeze(-1)
    if encoding == "onehot":
        return F.one_hot(ids.long(), vocab_size).to(torch.float32)
    if encoding == "embedding":
        return ids.long()
    raise ConfigError(f"encoding={encoding!r} is not allowed; use one of {', '.join(ENCODINGS)}")


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
        x = self.input_drop(x)
        out, state = self.lstm(x, state)
        if last_only:
            out = out[:, -1]
        return self.head(self.drop(out)), state


def sequence_bytes(net: CharLSTM, steps: int, logit_steps: int, training: bool, elem: int = 4) -> int:
    """A lower bound of the bytes one sequence of ``steps`` chars needs at once in ``net``: its encoded input and
    every layer's output, in training also each layer's four gates and cell state kept for the backward pass, and
    ``logit_steps`` rows of logits (in training with their gradient); ``elem`` bytes per value."""
    lstm = net.lstm
    per_step = lstm.input_size + net.layers * net.units * (6 if training else 1)
    return (steps * per_step + logit_steps * net.vocab_size * (2 if training else 1)) * elem
