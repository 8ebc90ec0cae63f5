"""Shared fixtures: configs composed from configs/ with Hydra's compose API, shrunk to run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models gain nothing from threads, and busy-waiting thread pools slow a shared 2-core machine badly;
# set before torch is imported so subprocesses started by tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal

# Commands under test get Ctrl-C as from a terminal. A runner that starts the suite in the background (a
# non-interactive shell's `cmd &`) hands it SIGINT ignored, which every child would inherit: a SIGINT sent
# before the command sets its own handler would then be lost.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

# The config groups hold the default recipe (every play, 10 minutes); these overrides give the shape tests start
# from: Macbeth alone in the tutorial's windows, 2 x 300 LSTM, Adam 1e-3, 10 epochs, early stopping after 5.
TUTORIAL_SHAPE = [
    "data.extra_plays=null",
    "data.main_repeat=1",
    "data.layout=windows",
    "data.batch_size=30",
    "data.val_max_windows=null",
    "model.encoding=normalized",
    "model.units=300",
    "model.dropout=0.2",
    "model.optimizer=adam",
    "model.lr=0.001",
    "model.weight_decay=0.0",
    "model.scheduler=none",
    "model.warmup_fraction=0.0",
    "model.min_lr_ratio=0.0",
    "trainer.max_epochs=10",
    "trainer.max_time=null",
    "trainer.gradient_clip_val=null",
    "trainer.val_check_interval=null",
    "callbacks.early_stopping.patience=5",
]

# A tiny model on a tiny slice of Macbeth: one epoch takes well under a second on a small CPU. TINY: no recipe
# (`~experiment`), the groups in the tutorial's shape, small.
SMALL = [
    "data.max_chars=4000",
    "data.batch_size=32",
    "data.val_max_windows=256",
    "model.units=16",
    "model.layers=2",
    "trainer.max_epochs=1",
    "trainer.enable_model_summary=false",
    "callbacks.rich_progress_bar=null",
    "sample.length=20",
]
TINY = ["~experiment", *TUTORIAL_SHAPE, *SMALL]
# the overrides a run from the shipped base model (init_from=base, experiment=finetune) must not shrink: its shape
BASE_SHAPE = ("model.units=", "model.embed_dim=")


def compose_cfg(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """The config `python train.py OVERRIDES` would see, without a Hydra run (no output dir set)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corpus cache for the whole session (Macbeth is converted once)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path: Path, data_dir: Path):
    """Build a tiny training config writing under this test's tmp_path: make_cfg("model.units=8", ...)."""

    def make(*overrides: str, config_name: str = "train") -> DictConfig:
        cfg = compose_cfg(config_name, [*TINY, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.outputs_root = str(tmp_path)
            cfg.paths.data_dir = str(data_dir)
        return cfg

    return make


@pytest.fixture
def text_file(tmp_path: Path):
    """Write ``text`` (str or bytes) to a file and return its path."""

    def write(text: str | bytes, name: str = "corpus.txt") -> Path:
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    return write
