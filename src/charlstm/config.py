"""Checks every configured value before any work starts; a bad one is one line naming key, value and the fix."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from charlstm.errors import ConfigError

# key -> (kind, rule, what is allowed). Kinds: int, float, bool, choice, optional int.
Rule = tuple[str, Callable[[Any], bool] | tuple[str, ...] | None, str]

TRAIN_RULES: dict[str, Rule] = {
    "data.seq_len": ("int", lambda v: v >= 1, "an integer >= 1"),
    "data.stride": ("int", lambda v: v >= 1, "an integer >= 1"),
    "data.batch_size": ("int", lambda v: v >= 1, "an integer >= 1"),
    "data.val_batch_size": ("int", lambda v: v >= 1, "an integer >= 1"),
    "data.num_workers": ("int", lambda v: v >= 0, "an integer >= 0"),
    "data.val_fraction": ("float", lambda v: 0 < v < 1, "a number with 0 < value < 1"),
    "data.val_max_windows": ("int?", lambda v: v >= 1, "null or an integer >= 1"),
    "data.max_chars": ("int?", lambda v: v >= 1, "null or an integer >= 1"),
    "data.lowercase": ("bool", None, "true or false"),
    "data.layout": ("choice", ("windows", "streams"), "windows or streams"),
    "data.targets": ("choice", ("last", "all"), "last or all"),
    "data.errors": ("choice", ("strict", "replace"), "strict or replace"),
    "data.source": ("choice", ("play", "file"), "play or file"),
    "model.encoding": ("choice", ("normalized", "onehot", "embedding"), "normalized, onehot or embedding"),
    "model.units": ("int", lambda v: v >= 1, "an integer >= 1"),
    "model.layers": ("int", lambda v: v >= 1, "an integer >= 1"),
    "model.embed_dim": ("int", lambda v: v >= 1, "an integer >= 1"),
    "model.dropout": ("float", lambda v: 0 <= v < 1, "a number with 0 <= value < 1"),
    "model.input_dropout": ("float", lambda v: 0 <= v < 1, "a number with 0 <= value < 1"),
    "model.optimizer": ("choice", ("adam", "adamw"), "adam or adamw"),
    "model.lr": ("float", lambda v: v > 0, "a number > 0"),
    "model.weight_decay": ("float", lambda v: v >= 0, "a number >= 0"),
    "model.scheduler": ("choice", ("none", "plateau", "cosine"), "none, plateau or cosine"),
    "model.warmup_steps": ("int", lambda v: v >= 0, "an integer >= 0"),
    "model.min_lr_ratio": ("float", lambda v: 0 <= v <= 1, "a number with 0 <= value <= 1"),
    "model.plateau_factor": ("float", lambda v: 0 < v < 1, "a number with 0 < value < 1"),
    "model.plateau_patience": ("int", lambda v: v >= 0, "an integer >= 0"),
    "trainer.max_epochs": ("int?", lambda v: v >= -1, "an integer >= 1 (or -1 for no limit)"),
    "trainer.gradient_clip_val": ("float?", lambda v: v > 0, "null or a number > 0"),
    "trainer.accelerator": ("choice", ("cpu", "gpu", "cuda", "mps", "auto"), "cpu, gpu, cuda, mps or auto"),
    "seed": ("int?", lambda v: v >= 0, "null or an integer >= 0"),
    "sample.length": ("int", lambda v: v >= 0, "an integer >= 0"),
    "sample.temperature": ("float", lambda v: v >= 0, "a number >= 0"),
}


def _get(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    """Raise ConfigError for the first value that breaks its rule; keys absent from ``cfg`` are skipped."""
    for key, (kind, rule, allowed) in rules.items():
        present, value = _get(cfg, key)
        if not present:
            continue
        bad = False
        optional = kind.endswith("?")
        base = kind.rstrip("?")
        if value is None:
            bad = not optional
        elif base == "bool":
            bad = not isinstance(value, bool)
        elif base == "choice":
            bad = value not in rule  # type: ignore[operator]
        elif base == "int":
            bad = isinstance(value, bool) or not isinstance(value, int) or not rule(value)  # type: ignore[misc]
        elif base == "float":
            bad = (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not rule(value)  # type: ignore[misc]
            )
        if bad:
            raise ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}")


def validate_train(cfg: DictConfig) -> None:
    check(cfg, TRAIN_RULES)
