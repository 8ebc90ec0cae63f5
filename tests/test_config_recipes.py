"""The recipes' resolved values: the config groups hold the measured default, `experiment=seed` the 2017 tutorial."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY, TUTORIAL_SHAPE, compose_cfg

# The measured default recipe (docs/recipes.md): streams over every play, 2 x 256 LSTM, AdamW 4e-3, cosine, 10 min
DEFAULT = {
    "data.play": "macbeth", "data.extra_plays": "auto", "data.main_repeat": 16, "data.layout": "streams",
    "data.seq_len": 50, "data.batch_size": 32, "data.val_max_windows": 2000, "data.lowercase": True,
    "model.encoding": "embedding", "model.embed_dim": 64, "model.units": 256, "model.layers": 2, "model.dropout": 0.0,
    "model.optimizer": "adamw", "model.lr": 0.004, "model.weight_decay": 0.01, "model.scheduler": "cosine",
    "model.warmup_steps": 0, "model.warmup_fraction": 0.02, "model.min_lr_ratio": 0.05,
    "trainer.precision": "auto", "trainer.max_epochs": -1, "trainer.max_steps": -1, "trainer.max_time": "00:00:10:00",
    "trainer.gradient_clip_val": 1.0, "trainer.val_check_interval": 200, "callbacks.early_stopping.patience": 20,
}  # fmt: skip
# The 2017 tutorial: lowercased Macbeth alone, 50-char windows (stride 1) scaled to [0, 1], next char only,
# LSTM(300) x 2 with dropout 0.2, Adam 1e-3, batch 30, 100 epochs, fp32, no early stopping
SEED = {
    "data.play": "macbeth", "data.extra_plays": None, "data.main_repeat": 1, "data.layout": "windows",
    "data.seq_len": 50, "data.stride": 1, "data.targets": "last", "data.batch_size": 30, "data.val_max_windows": None,
    "data.lowercase": True, "model.encoding": "normalized", "model.units": 300, "model.layers": 2,
    "model.dropout": 0.2, "model.input_dropout": 0.0, "model.output_dropout": None, "model.optimizer": "adam",
    "model.lr": 0.001, "model.weight_decay": 0.0, "model.scheduler": "none", "model.warmup_steps": 0,
    "model.warmup_fraction": 0.0, "model.min_lr_ratio": 0.0, "trainer.precision": "32-true",
    "trainer.max_epochs": 100, "trainer.max_steps": -1, "trainer.max_time": None, "trainer.gradient_clip_val": None,
    "trainer.val_check_interval": None, "callbacks.early_stopping": None,
}  # fmt: skip
# char-rnn on Macbeth alone, constant lr; plays: the same over every other play too, one pass
CHARRNN = {
    **DEFAULT, "data.extra_plays": None, "data.main_repeat": 1, "model.dropout": 0.25, "model.scheduler": "none",
    "model.warmup_fraction": 0.0, "model.min_lr_ratio": 0.0, "trainer.max_epochs": 200,
    "trainer.val_check_interval": None, "callbacks.early_stopping.patience": 8,
}  # fmt: skip
PLAYS = {**CHARRNN, "data.extra_plays": "auto", "trainer.max_epochs": 1, "trainer.val_check_interval": 100}
# a small text of the user's, from the shipped base model, with dropout, for 90 s
FINETUNE = {
    **DEFAULT, "init_from": "base", "data.source": "file", "data.path": "x.txt", "data.lowercase": False,
    "model.dropout": 0.2, "model.weight_decay": 0.1, "trainer.max_time": "00:00:01:30",
}  # fmt: skip


def values(overrides: list[str], keys: dict) -> dict:
    """The composed config's value of each of ``keys``, as `python train.py OVERRIDES` resolves it."""
    cfg = compose_cfg("train", overrides)
    return {key: OmegaConf.select(cfg, key) for key in keys}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [([], DEFAULT), (["experiment=seed"], SEED), (["experiment=charrnn"], CHARRNN), (["experiment=plays"], PLAYS),
     (["data=file", "data.path=x.txt"], {**DEFAULT, "data.source": "file", "data.path": "x.txt"}),
     (["experiment=seed", "data=file", "data.path=x.txt"], {**SEED, "data.source": "file", "data.path": "x.txt"}),
     (["data=shakespeare"], {**DEFAULT, "data.play": "all"}),
     (["data=macbeth"], {**DEFAULT, "data.extra_plays": None, "data.main_repeat": 1}),
     (["experiment=finetune", "data.path=x.txt"], FINETUNE)],
)  # fmt: skip
def test_a_recipe_resolves_to_its_known_values(overrides, expected):
    assert values(overrides, expected) == expected


def test_tests_start_from_the_tutorial_shape():
    """TUTORIAL_SHAPE sets the groups back to the tutorial's values, bar the tutorial's fp32, 100 epochs and no early
    stopping: the shape the tests' tiny runs were written for."""
    shape = {**SEED, "trainer.precision": "auto", "trainer.max_epochs": 10, "callbacks.early_stopping.patience": 5}
    del shape["callbacks.early_stopping"]
    assert values(["~experiment", *TUTORIAL_SHAPE], shape) == shape
    assert values(TINY, {"trainer.max_time": None, "data.extra_plays": None}) == {
        "trainer.max_time": None,
        "data.extra_plays": None,
    }
