"""TensorBoard dashboards, read back from the event files: HParams, train/bpc, one lr curve, custom scalars."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as scalars_metadata
from tensorboard.plugins.hparams import metadata as hp_metadata

from charlstm.callbacks import ConfigHParams, LearningRate, flatten_config
from charlstm.train import train
from tests import forkserver
from tests.conftest import ROOT, TINY, compose_cfg

QUIET = ["callbacks.text_sample=null", "trainer.enable_progress_bar=false", "sample.length=0"]


def events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def hparams_summaries(logdir: Path, tag: str) -> list[bytes]:
    """The plugin contents of every summary with ``tag`` in every event file of ``logdir``."""
    found = []
    for file in sorted(logdir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(file)).Load():
            found += [v.metadata.plugin_data.content for v in event.summary.value if v.tag == tag]
    return found


def session_hparams(logdir: Path) -> dict[str, object]:
    starts = hparams_summaries(logdir, hp_metadata.SESSION_START_INFO_TAG)
    assert len(starts) == 1, f"{len(starts)} HParams entries in one run"
    info = hp_metadata.parse_session_start_info_plugin_data(starts[0])
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """One tiny run with a cosine schedule, weight decay (two parameter groups) and a list-valued key."""
    root = tmp_path_factory.mktemp("tb_run")
    overrides = [*TINY, *QUIET, "trainer.max_epochs=2", "trainer.max_steps=500", "data.seq_len=24",
                 "trainer.log_every_n_steps=5", "model.scheduler=cosine", "model.weight_decay=0.01",
                 "+tags=[small,test]"]  # fmt: skip
    cfg = compose_cfg("train", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
        cfg.paths.outputs_root = str(root)
        cfg.paths.data_dir = str(data_dir)
    metrics, objects = train(cfg)
    logdir = root / "run" / "tensorboard"
    return SimpleNamespace(metrics=metrics, logdir=logdir, acc=events(logdir), model=objects["model"])


def test_hparams_hold_the_whole_flattened_config(run):
    hp = session_hparams(run.logdir)
    assert hp["data.seq_len"] == 24
    assert hp["data.batch_size"] == 32
    assert hp["model.units"] == 16
    assert hp["trainer.max_steps"] == 500
    assert hp["seed"] == 1234
    assert hp["model.scheduler"] == "cosine"
    assert hp["data.sha256"] == "null"  # None as text (TensorBoard drops None)
    assert hp["tags"] == '["small", "test"]'  # a list as text
    assert hp["data.lowercase"] == "true"
    assert hp["vocab_size"] == len(run.model.hparams.vocab)
    assert not any(k.endswith("_target_") for k in hp)


def test_hparams_metrics_are_the_runs_own_and_no_placeholder(run):
    experiments = hparams_summaries(run.logdir, hp_metadata.EXPERIMENT_TAG)
    assert len(experiments) == 1
    exp = hp_metadata.parse_experiment_plugin_data(experiments[0])
    assert [m.name.tag for m in exp.metric_infos] == ["hp/val_bpc_best", "hp/val_bpc", "hp/train_seconds"]
    tags = run.acc.Tags()["scalars"]
    assert "hp_metric" not in tags
    last = {t: run.acc.Scalars(t)[-1].value for t in ("hp/val_bpc", "hp/val_bpc_best", "hp/train_seconds")}
    assert last["hp/val_bpc"] == pytest.approx(run.metrics["val/bpc"], abs=1e-5)
    assert last["hp/val_bpc_best"] == pytest.approx(run.metrics["val/bpc_best"], abs=1e-5)
    assert len(run.acc.Scalars("hp/val_bpc")) == 2  # one per validation
    seconds = [s.value for s in run.acc.Scalars("hp/train_seconds")]
    assert 0 < seconds[0] <= seconds[-1] < 300
    assert hparams_summaries(run.logdir, hp_metadata.SESSION_END_INFO_TAG)


def test_train_bpc_is_train_loss_in_bits(run):
    loss = {s.step: s.value for s in run.acc.Scalars("train/loss_step")}
    bpc = {s.step: s.value for s in run.acc.Scalars("train/bpc_step")}
    assert loss and loss.keys() == bpc.keys()
    for step, value in loss.items():
        assert bpc[step] == pytest.approx(value / math.log(2), rel=1e-5)
    assert "train/bpc_epoch" in run.acc.Tags()["scalars"]


def test_one_learning_rate_curve_per_optimizer(run):
    lr_tags = [t for t in run.acc.Tags()["scalars"] if "lr" in t.split("/")[-1].lower()]
    assert lr_tags == ["train/lr"]  # two parameter groups (decay / no decay), one curve
    values = [s.value for s in run.acc.Scalars("train/lr")]
    assert max(values) == pytest.approx(1e-3, rel=1e-2) and max(values) <= 1e-3
    assert values == sorted(values, reverse=True) and values[-1] < 1e-4  # the cosine schedule, decaying to 0


def test_learning_rate_curves_split_only_where_rates_differ():
    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    same = torch.optim.Adam([{"params": [p[0]]}, {"params": [p[1]]}], lr=0.1)
    differ = torch.optim.SGD([{"params": [p[2]], "lr": 0.5}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.2)
    assert LearningRate().rates(SimpleNamespace(optimizers=[same])) == {"train/lr": 0.1}
    assert LearningRate().rates(SimpleNamespace(optimizers=[same, differ])) == {
        "train/lr/opt0": 0.1, "train/lr/opt1/pg0": 0.5, "train/lr/opt1/pg1": 0.2,
    }  # fmt: skip


def test_custom_scalars_put_train_and_validation_bpc_on_one_chart(run):
    tensors = run.acc.Tensors(scalars_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensors[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    tags = run.acc.Tags()["scalars"]
    drawn = sorted(t for t in tags if any(re.search(p, t) for p in charts["bits/char"]))
    assert drawn == ["train/bpc_epoch", "train/bpc_step", "val/bpc", "val/bpc_best"]
    assert any(re.search(p, "train/lr") for p in charts["learning rate"])


def test_flatten_config_dots_nested_keys_and_writes_none_and_lists_as_text():
    flat = flatten_config({"a": {"b": 1, "c": None, "_target_": "x.Y", "d": {"e": [1, "two"]}}, "f": True, "g": {}})
    assert flat == {"a.b": 1, "a.c": "null", "a.d.e": '[1, "two"]', "f": "true", "g": "null"}


def test_without_a_config_the_models_hyperparameters_are_used():
    module = SimpleNamespace(hparams={"vocab": ["a", "b"], "units": 8, "output_dropout": None})
    assert ConfigHParams().params(module) == {"model.units": 8, "model.output_dropout": "null", "vocab_size": 2}


@pytest.mark.slow
def test_every_sweep_job_has_its_config_and_experiment_in_hparams(tmp_path, data_dir):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=seed", *TINY[1:], *QUIET, "model.units=8,12",
           "data.seq_len=20", "trainer.max_steps=30", "trainer.val_check_interval=10", f"paths.outputs_root={tmp_path}",
           f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    proc = forkserver.run(cmd, ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logdirs = sorted((tmp_path / "sweep").glob("*/tensorboard"))
    assert len(logdirs) == 2
    seen = []
    for logdir in logdirs:
        hp = session_hparams(logdir)
        assert hp["data.seq_len"] == 20 and hp["data.batch_size"] == 32 and hp["trainer.max_steps"] == 30
        assert hp["experiment"] == "seed"
        seen.append(hp["model.units"])
        assert "hp/val_bpc_best" in events(logdir).Tags()["scalars"]
    assert sorted(seen) == [8, 12]


def test_a_resumed_run_keeps_one_entry_and_its_training_time(make_cfg, tmp_path):
    first, _ = train(make_cfg(*QUIET))
    logdir = tmp_path / "run" / "tensorboard"
    before = events(logdir).Scalars("hp/train_seconds")[-1].value
    resumed, _ = train(make_cfg(*QUIET, "trainer.max_epochs=2", "ckpt_path=last"))
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2
    session_hparams(logdir)  # exactly one entry
    acc = events(logdir)
    assert [s.value for s in acc.Scalars("hp/val_bpc")] == pytest.approx([first["val/bpc"], resumed["val/bpc"]])
    assert acc.Scalars("hp/train_seconds")[-1].value > before > 0
