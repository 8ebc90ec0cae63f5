"""Every bad setting is refused before any work starts, in one line naming the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from charlstm.app.config import check
from charlstm.app.train import train
from charlstm.core.errors import ConfigError
from tests import forkserver
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]

BAD = [
    ("model.units=0", "model.units=0 is not allowed: it must be an integer >= 1"),
    ("model.units=abc", "model.units='abc' is not allowed: it must be an integer >= 1"),
    ("model.units=2.5", "model.units=2.5 is not allowed: it must be an integer >= 1"),
    ("model.layers=0", "model.layers=0 is not allowed: it must be an integer >= 1"),
    ("model.dropout=1.0", "model.dropout=1.0 is not allowed: it must be a number with 0 <= value < 1"),
    ("model.dropout=-0.1", "model.dropout=-0.1 is not allowed: it must be a number with 0 <= value < 1"),
    ("model.lr=0", "model.lr=0 is not allowed: it must be a number > 0"),
    ("model.lr=nan", "model.lr=nan is not allowed: it must be a number > 0"),
    ("model.embed_dim=0", "model.embed_dim=0 is not allowed: it must be an integer >= 1"),
    ("model.weight_decay=-1", "model.weight_decay=-1 is not allowed: it must be a number >= 0"),
    ("model.encoding=ascii", "model.encoding='ascii' is not allowed: it must be normalized, onehot or embedding"),
    ("model.optimizer=sgd", "model.optimizer='sgd' is not allowed: it must be adam or adamw"),
    ("model.scheduler=step", "model.scheduler='step' is not allowed: it must be none, plateau or cosine"),
    ("model.warmup_fraction=1.0",
     "model.warmup_fraction=1.0 is not allowed: it must be a number with 0 <= value < 1"),
    ("data.seq_len=0", "data.seq_len=0 is not allowed: it must be an integer >= 1"),
    ("data.stride=0", "data.stride=0 is not allowed: it must be an integer >= 1"),
    ("data.batch_size=0", "data.batch_size=0 is not allowed: it must be an integer >= 1"),
    ("data.val_fraction=0", "data.val_fraction=0 is not allowed: it must be a number with 0 < value < 1"),
    ("data.val_fraction=1.0", "data.val_fraction=1.0 is not allowed: it must be a number with 0 < value < 1"),
    ("data.layout=grid", "data.layout='grid' is not allowed: it must be windows or streams"),
    ("data.targets=first", "data.targets='first' is not allowed: it must be last or all"),
    ("data.errors=ignore", "data.errors='ignore' is not allowed: it must be strict or replace"),
    ("data.lowercase=maybe", "data.lowercase='maybe' is not allowed: it must be true or false"),
    ("data.sha256=abc", "data.sha256='abc' is not allowed: it must be null or 64 hex digits"),
    ("sample.length=-1", "sample.length=-1 is not allowed: it must be an integer >= 0"),
    ("sample.temperature=-0.5",
     "sample.temperature=-0.5 is not allowed: it must be a number >= 0 (0 is greedy argmax)"),
    ("seed=-1", "seed=-1 is not allowed: it must be null or an integer >= 0"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed: it must be an integer >= 1 (or -1 for no limit)"),
    ("trainer.accelerator=tpu", "trainer.accelerator='tpu' is not allowed: it must be cpu, gpu, cuda, mps or auto"),
    (
        "trainer.precision=8",
        "trainer.precision=8 is not allowed: it must be 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true or 64-true",
    ),
    (
        "trainer.max_time=10min",
        "trainer.max_time='10min' is not allowed: it must be null or a duration \"DD:HH:MM:SS\", e.g. \"00:02:00:00\"",
    ),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 is not allowed: it must be null or a number >= 0"),
    (
        "callbacks.last_checkpoint.every_n_train_steps=0",
        "callbacks.last_checkpoint.every_n_train_steps=0 is not allowed: it must be null or an integer >= 1",
    ),
    (
        "callbacks.last_checkpoint.train_time_interval=-5",
        "callbacks.last_checkpoint.train_time_interval=-5 is not allowed: it must be null or a number of seconds > 0",
    ),
    (
        "callbacks.early_stopping.patience=-1",
        "callbacks.early_stopping.patience=-1 is not allowed: it must be an integer >= 0",
    ),
    (
        "data.encoding=onehot",
        "data.encoding='onehot' differs from model.encoding='normalized'; "
        "set model.encoding only (data.encoding follows it)",
    ),
    ("trainer.min_epochs=5", "trainer.min_epochs=5 is more than trainer.max_epochs=1; lower min_epochs"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), BAD, ids=[o for o, _ in BAD])
def test_bad_value_is_refused_in_one_line_before_any_work(make_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        train(make_cfg(override))
    assert str(info.value) == message
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained


def test_good_values_at_the_edges_pass(make_cfg):
    from charlstm.app.config import validate_train

    validate_train(make_cfg("model.dropout=0", "data.val_fraction=0.5", "sample.temperature=0", "sample.length=0",
                            "trainer.max_epochs=-1", "seed=null", "trainer.max_time=00:01:00:00"))  # fmt: skip


def test_unknown_key_in_a_recipe_is_named_with_a_suggestion(make_cfg):
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.model.unitz = 3  # what an experiment file with a typo adds
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert (
        str(info.value)
        == "model.unitz is not a setting of charlstm.training.model.CharLSTMModule; did you mean model.units?"
    )


def test_unknown_key_on_the_command_line_is_refused_by_hydra():
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("train", ["model.unitz=3"])
    assert "model.unitz" in str(info.value)


def test_a_value_left_missing_is_named(make_cfg):
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.data.seq_len = "???"
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert str(info.value) == "data.seq_len must be set: add data.seq_len=VALUE to the command"


def test_a_missing_value_is_found_deep_inside_without_resolving_interpolations():
    from omegaconf import OmegaConf

    from charlstm.app.config import check_missing

    cfg = OmegaConf.create({"a": "${hydra:runtime.output_dir}", "b": "${c}", "c": {"d": None, "e": {"f": "???"}}})
    with pytest.raises(ConfigError, match=r"^c\.e\.f must be set"):
        check_missing(cfg)
    cfg.c.e.f = 1
    check_missing(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_without_a_gpu_is_one_line(make_cfg):
    with pytest.raises(ConfigError) as info:
        train(make_cfg("trainer.accelerator=gpu"))
    assert str(info.value).startswith("trainer.accelerator=gpu but no CUDA GPU is visible to torch (torch ")
    assert str(info.value).endswith("run on the CPU with trainer=cpu (or trainer.accelerator=cpu)")


def test_one_rule_per_value_shared_by_training_generation_and_evaluation():
    """A value's rule is written once: the generation API, the generate and eval tables and the train table's
    sample.* and choice keys use the same rule objects (and the constants the classes dispatch on)."""
    from charlstm.app.config import TRAIN_RULES
    from charlstm.app.evaluate import EVAL_RULES
    from charlstm.app.generate import GENERATE_RULES
    from charlstm.core.net import ENCODINGS
    from charlstm.core.sampling import SAMPLING_RULES
    from charlstm.data.windows import LAYOUTS, TARGETS

    for key, rule in SAMPLING_RULES.items():
        assert GENERATE_RULES[key] is rule
    assert EVAL_RULES["unknown"] is SAMPLING_RULES["unknown"] and EVAL_RULES["device"] is GENERATE_RULES["device"]
    assert TRAIN_RULES["sample.length"] is SAMPLING_RULES["length"]
    assert TRAIN_RULES["sample.temperature"] is SAMPLING_RULES["temperature"]
    assert TRAIN_RULES["model.encoding"][1] is ENCODINGS
    assert TRAIN_RULES["data.layout"][1] is LAYOUTS and TRAIN_RULES["data.targets"][1] is TARGETS
    assert all(k in EVAL_RULES for k in TRAIN_RULES if k.startswith("data.") and k != "data.encoding")


def test_every_setting_of_the_model_and_data_classes_has_a_rule_or_a_check_of_its_own():
    """The classes take configured values as given, so each of their settings is in the table (or is one checked
    where it is read: a vocabulary, extra plays, paths; or set by train() from the data section)."""
    import inspect

    from charlstm.app.config import TRAIN_RULES
    from charlstm.training.datamodule import CharDataModule
    from charlstm.training.model import CharLSTMModule

    own = {"data": {"path", "data_dir", "vocab", "extra_plays", "encoding"},
           "model": {"vocab", "seq_len", "layout", "lowercase", "init_from"}}  # fmt: skip
    for section, cls in (("data", CharDataModule), ("model", CharLSTMModule)):
        names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
        unruled = [n for n in names if f"{section}.{n}" not in TRAIN_RULES and n not in own[section]]
        assert unruled == [], f"{section} settings without a rule: {unruled}"


def test_rules_skip_absent_keys():
    rules = {"top_p": ("float", lambda v: 0 < v <= 1, "a number with 0 < value <= 1")}
    check(OmegaConf.create({"unrelated": 1}), rules)
    with pytest.raises(ConfigError, match=r"^top_p=0 is not allowed: it must be a number with 0 < value <= 1$"):
        check(OmegaConf.create({"top_p": 0}), rules)


# -- the command line: one line on stderr, no traceback, non-zero exit -------------------------------------------

COMMANDS = {
    "units": ["model.units=0"],
    "typo": ["model.unitz=3"],
    "gpu": ["trainer.accelerator=gpu"],
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The commands run side by side (each is mostly interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("cli")
    procs = {
        name: forkserver.popen(
            [sys.executable, str(ROOT / "train.py"), *args, f"paths.outputs_root={tmp}", f"hydra.run.dir={tmp / name}"],
            ROOT,
        )
        for name, args in COMMANDS.items()
    }  # fmt: skip
    return {name: subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate()) for name, p in procs.items()}


@pytest.mark.slow
def test_cli_bad_value_prints_exactly_one_error_line(cli_runs):
    run = cli_runs["units"]
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == ["error: model.units=0 is not allowed: it must be an integer >= 1"]
    assert run.stdout == ""


@pytest.mark.slow
def test_cli_typo_in_a_key_names_the_key(cli_runs):
    run = cli_runs["typo"]
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        "error: model.unitz is not a setting: did you mean model.units? "
        "(to add a new key on purpose: +model.unitz=VALUE)"
    ]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_gpu_without_a_gpu_prints_one_line(cli_runs):
    run = cli_runs["gpu"]
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trainer.accelerator=gpu but no CUDA GPU is visible")
