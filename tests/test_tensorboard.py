"""TensorBoard dashboards, read back from the event files with TensorBoard's own readers: HParams, the README's
tags, one lr curve, custom scalars, validation points at the console's steps, runs named by their folders."""

from __future__ import annotations

import json
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
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as scalars_metadata
from tensorboard.plugins.hparams import metadata as hp_metadata

from charlstm.app.train import train
from charlstm.training.callbacks import LEADING_HPARAMS, ConfigHParams, LearningRate, flatten_config
from charlstm.training.progress import ValidationLog
from tests import forkserver
from tests.conftest import ROOT, SMALL, TINY, compose_cfg

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


def experiment(logdir: Path):
    (content,) = hparams_summaries(logdir, hp_metadata.EXPERIMENT_TAG)
    return hp_metadata.parse_experiment_plugin_data(content)


def run_names(logdir: Path) -> list[str]:
    """The runs TensorBoard lists for ``tensorboard --logdir logdir``."""
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    return sorted(multiplexer.Runs())


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
                 "+tags=[small,test]", "data.test_fraction=0.1"]  # fmt: skip
    cfg = compose_cfg("train", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
        cfg.paths.outputs_root = str(root)
        cfg.paths.data_dir = str(data_dir)
    metrics, objects = train(cfg)
    logdir = root / "run"
    return SimpleNamespace(metrics=metrics, logdir=logdir, acc=events(logdir), model=objects.model, root=root,
                           objects=objects)  # fmt: skip


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


def test_hparams_open_with_the_keys_users_compare(run):
    exp = experiment(run.logdir)
    names = [info.name for info in exp.hparam_infos]
    leading = [k for k in LEADING_HPARAMS if k in names]  # no `experiment` outside a Hydra run
    assert leading == ["model.units", "model.layers", "model.lr", "data.seq_len", "data.batch_size"]
    assert names[: len(leading)] == leading
    assert [info.name for info in exp.hparam_infos if info.differs] == leading
    assert len(names) > 40 and "callbacks.early_stopping.patience" in names  # the whole config stays
    # TensorBoard's hparams plugin serves the experiment sorted by (not differs, name): these lead its table
    from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit

    _sort_and_reduce_to_hparams_limit(exp)
    assert [info.name for info in exp.hparam_infos][: len(leading)] == sorted(leading)


def test_the_run_is_listed_by_its_run_folders_name(run):
    assert run_names(run.root) == ["run"]


def test_hparams_metrics_are_the_runs_own_and_no_placeholder(run):
    exp = experiment(run.logdir)
    assert [m.name.tag for m in exp.metric_infos] == ["hp/val_bpc_best", "hp/val_bpc", "hp/train_seconds"]
    tags = run.acc.Tags()["scalars"]
    assert "hp_metric" not in tags
    last = {t: run.acc.Scalars(t)[-1].value for t in ("hp/val_bpc", "hp/val_bpc_best", "hp/train_seconds")}
    assert last["hp/val_bpc"] == pytest.approx(run.metrics["val/bpc"], abs=1e-5)
    assert last["hp/val_bpc_best"] == pytest.approx(run.metrics["val/bpc_best"], abs=1e-5)
    assert len(run.acc.Scalars("hp/val_bpc")) == 2  # one per validation
    seconds = [s.value for s in run.acc.Scalars("hp/train_seconds")]
    assert 0 < seconds[0] <= seconds[-1] < 300
    # the run's one training time (validation excluded): the model's clock, as result.json and the console say
    assert seconds[-1] == pytest.approx(run.model.train_seconds(), rel=1e-6)
    assert hparams_summaries(run.logdir, hp_metadata.SESSION_END_INFO_TAG)


def test_train_bpc_is_train_loss_in_bits(run):
    loss = {s.step: s.value for s in run.acc.Scalars("train/loss")}
    bpc = {s.step: s.value for s in run.acc.Scalars("train/bpc")}
    assert loss and loss.keys() == bpc.keys()
    for step, value in loss.items():
        assert bpc[step] == pytest.approx(value / math.log(2), rel=1e-5)


def test_the_readmes_tensorboard_tags_are_the_event_files_tags(run):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = readme[readme.index("**TensorBoard**") :].split("\n\n")[0]
    listing = next(line for line in readme.splitlines() if line.startswith("events.out.tfevents.*"))
    named = set(re.findall(r"`((?:train|val|hp)/[a-z_]+)`", paragraph)) | set(
        re.findall(r"\b(?:train|val)/[a-z_]+", listing)
    )
    assert {"train/loss", "train/bpc", "val/bpc", "train/lr", "hp/train_seconds"} <= named
    tags = set(run.acc.Tags()["scalars"])
    assert named <= tags, f"README names {sorted(named - tags)}, the event file has {sorted(tags)}"
    assert not [t for t in tags if t.endswith(("_step", "_epoch"))]


def test_validation_points_sit_at_the_steps_the_console_prints(run):
    history = next(cb.history for cb in run.objects.callbacks if isinstance(cb, ValidationLog))
    console = [step for step, _ in history]
    assert len(console) == 2 and console[-1] == run.objects.trainer.global_step
    for tag in ("val/bpc", "val/loss", "hp/val_bpc", "hp/train_seconds"):
        assert [s.step for s in run.acc.Scalars(tag)] == console, tag
    assert [s.step for s in run.acc.Scalars("test/bpc")] == console[-1:]  # the held-out text, scored at the end
    epochs = [s.step for s in run.acc.Scalars("epoch")]
    assert epochs == console  # once per validation, not twice (nor again with the test scores)
    train_steps = [s.step for s in run.acc.Scalars("train/loss")]
    assert train_steps[0] == 5 and console[-1] in train_steps  # every 5 steps done, the last one included


def test_the_time_schedule_draws_one_learning_rate_curve(make_cfg, tmp_path):
    # trainer.max_time drives warm-up and cosine decay; two parameter groups (decay / no decay) share the schedule
    cfg = make_cfg(*QUIET, "model.scheduler=cosine", "model.warmup_fraction=0.2", "model.min_lr_ratio=0.05",
                   "model.weight_decay=0.01", "trainer.max_time=00:00:00:04", "trainer.max_epochs=-1",
                   "trainer.max_steps=-1", "trainer.limit_val_batches=0", "callbacks.early_stopping=null",
                   "trainer.log_every_n_steps=1", "callbacks.model_checkpoint=null")  # fmt: skip
    _, objects = train(cfg)
    assert len(objects.trainer.optimizers[0].param_groups) == 2
    acc = events(tmp_path / "run")
    assert [t for t in acc.Tags()["scalars"] if "lr" in t] == ["train/lr"]
    values = [s.value for s in acc.Scalars("train/lr")]
    peak = values.index(max(values))
    assert len(values) > 10 and 0 < peak < len(values) - 1
    assert max(values) == pytest.approx(1e-3, rel=0.1) and max(values) <= 1e-3 * (1 + 1e-6)  # float32
    assert values[0] < 0.5e-3 and values[: peak + 1] == sorted(values[: peak + 1])  # warm-up
    assert values[peak:] == sorted(values[peak:], reverse=True)  # cosine decay ...
    assert 0.05e-3 * (1 - 1e-6) <= values[-1] < 0.2e-3  # ... to 0.05 x the peak at the budget's end


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
    assert drawn == ["train/bpc", "val/bpc", "val/bpc_best"]
    assert any(re.search(p, "train/lr") for p in charts["learning rate"])


def test_flatten_config_dots_nested_keys_and_writes_none_and_lists_as_text():
    flat = flatten_config({"a": {"b": 1, "c": None, "_target_": "x.Y", "d": {"e": [1, "two"]}}, "f": True, "g": {}})
    assert flat == {"a.b": 1, "a.c": "null", "a.d.e": '[1, "two"]', "f": "true", "g": "null"}


def test_without_a_config_the_models_hyperparameters_are_used():
    module = SimpleNamespace(hparams={"vocab": ["a", "b"], "units": 8, "output_dropout": None})
    assert ConfigHParams().params(module) == {"model.units": 8, "model.output_dropout": "null", "vocab_size": 2}


@pytest.mark.slow
def test_every_sweep_job_has_its_config_and_experiment_in_hparams(tmp_path, data_dir):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=seed", *SMALL, *QUIET, "model.units=8,12",
           "data.seq_len=20", "trainer.max_steps=30", "trainer.val_check_interval=10", f"paths.outputs_root={tmp_path}",
           f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    proc = forkserver.run(cmd, ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logdirs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert run_names(tmp_path / "sweep") == ["0_model.units=8", "1_model.units=12"]  # the job folders
    seen = []
    for logdir in logdirs:
        hp = session_hparams(logdir)
        assert hp["data.seq_len"] == 20 and hp["data.batch_size"] == 32 and hp["trainer.max_steps"] == 30
        assert hp["experiment"] == "seed"
        leading = [info.name for info in experiment(logdir).hparam_infos][:3]
        assert leading == ["model.units", "experiment", "model.layers"]  # the swept key, then the usual ones
        # one training time: the console's, hp/train_seconds, result.json's and the summary's "time (s)"
        seconds = json.loads((logdir / "result.json").read_text())["train_seconds"]
        assert events(logdir).Scalars("hp/train_seconds")[-1].value == pytest.approx(seconds, rel=1e-6)
        assert f"after {seconds:.1f} s of training (validation excluded)" in proc.stdout + proc.stderr
        assert f"| {seconds:.1f} | {logdir.name} |" in (tmp_path / "sweep" / "summary.md").read_text()
        seen.append(hp["model.units"])
        assert "hp/val_bpc_best" in events(logdir).Tags()["scalars"]
    assert sorted(seen) == [8, 12]


def test_a_resumed_run_keeps_one_entry_and_its_training_time(make_cfg, tmp_path):
    first, _ = train(make_cfg(*QUIET))
    logdir = tmp_path / "run"
    before = events(logdir).Scalars("hp/train_seconds")[-1].value
    resumed, _ = train(make_cfg(*QUIET, "trainer.max_epochs=2", "ckpt_path=last"))
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2
    session_hparams(logdir)  # exactly one entry
    acc = events(logdir)
    assert [s.value for s in acc.Scalars("hp/val_bpc")] == pytest.approx([first["val/bpc"], resumed["val/bpc"]])
    assert acc.Scalars("hp/train_seconds")[-1].value > before > 0
