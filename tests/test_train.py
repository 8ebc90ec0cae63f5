"""End to end: train() on a tiny slice writes checkpoints, TensorBoard events and the resolved config."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from charlstm.app.train import train
from charlstm.core.checkpoint import load
from charlstm.training.model import CharLSTMModule
from tests.conftest import CONFIG_DIR, TUTORIAL_SHAPE, compose_cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = compose_cfg("train", [
        "~experiment", *TUTORIAL_SHAPE,
        "data.max_chars=4000", "data.batch_size=32", "data.val_max_windows=256", "model.units=16",
        "trainer.max_epochs=2", "trainer.enable_model_summary=false", "callbacks.rich_progress_bar=null",
        f"paths.output_dir={tmp / 'out'}", f"paths.data_dir={tmp / 'data'}", f"paths.outputs_root={tmp}",
    ])  # fmt: skip
    metrics, objects = train(cfg)
    return metrics, objects, tmp / "out"


def test_train_writes_checkpoints_events_and_config(tiny_run):
    metrics, objects, out = tiny_run
    assert (out / "checkpoints" / "last.ckpt").is_file()
    best = list((out / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    assert list(out.glob("events.out.tfevents.*"))  # in the run folder: TensorBoard names the run by it
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.units == 16 and saved.data.seq_len == 50
    assert objects.trainer.current_epoch == 2
    for key in ("train/loss", "val/loss", "val/bpc", "val/ppl", "val/loss_best", "val/bpc_best"):
        assert key in metrics
    assert metrics["val/bpc"] == pytest.approx(metrics["val/loss"] / torch.log(torch.tensor(2.0)).item())
    assert metrics["val/loss_best"] <= metrics["val/loss"] + 1e-6


def test_checkpoint_loads_with_weights_only_and_needs_no_corpus(tiny_run):
    _, objects, out = tiny_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["vocab"] == objects.datamodule.vocab.to_list()
    assert (hp["encoding"], hp["units"], hp["layers"], hp["seq_len"], hp["layout"]) == (
        "normalized", 16, 2, 50, "windows",
    )  # fmt: skip
    model = CharLSTMModule(**hp)
    model.load_state_dict(ckpt["state_dict"])
    for name, tensor in objects.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert load(out / "checkpoints" / "last.ckpt")["global_step"] == ckpt["global_step"] > 0


def test_training_reduces_loss(tiny_run):
    metrics, objects, _ = tiny_run
    # an untrained model predicts ~uniformly: ln(vocab) nats/char
    uniform = torch.log(torch.tensor(float(len(objects.datamodule.vocab)))).item()
    assert metrics["val/loss"] < uniform


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("option", _group_options("data"))
def test_every_data_config_instantiates(option, tmp_path, text_file):
    path = text_file("Double, double toil and trouble;\nFire burn and cauldron bubble.\n" * 10)
    cfg = compose_cfg(
        "train", ["~experiment", *TUTORIAL_SHAPE, f"data={option}", f"data.path={path}", f"paths.data_dir={tmp_path}"]
    )
    dm = instantiate(cfg.data)
    assert dm.seq_len == cfg.data.seq_len
    if option != "shakespeare":  # all plays: 5 MB, converted elsewhere
        dm.load()
        assert len(dm.vocab) > 10


@pytest.mark.parametrize("option", _group_options("trainer"))
def test_every_trainer_config_composes(option):
    cfg = compose_cfg("train", [f"trainer={option}"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if cfg.trainer.accelerator == "cpu":
        from charlstm.core.hardware import resolve_precision

        cfg.trainer.default_root_dir = "."
        cfg.trainer.precision = resolve_precision(cfg.trainer.precision, "cpu")
        instantiate(cfg.trainer, logger=False, enable_checkpointing=False)


@pytest.mark.parametrize("group", ["callbacks", "logger"])
def test_every_callback_and_logger_instantiates(group, tmp_path):
    for option in _group_options(group):
        cfg = compose_cfg("train", [f"{group}={option}", f"paths.output_dir={tmp_path}"])
        for node in (cfg.get(group) or {}).values():
            if node is not None:
                assert instantiate(node) is not None


@pytest.mark.parametrize("option", _group_options("experiment") + _group_options("debug"))
def test_every_experiment_and_debug_config_composes(option):
    group = "experiment" if (CONFIG_DIR / "experiment" / f"{option}.yaml").exists() else "debug"
    cfg = compose_cfg("train", [f"{group}={option}"])
    instantiate(cfg.model, vocab=list("abc"), seq_len=cfg.data.seq_len, layout=cfg.data.layout)


def test_default_recipe_is_the_measured_one():
    cfg = compose_cfg("train")
    assert (cfg.data.layout, cfg.data.extra_plays, cfg.model.encoding) == ("streams", "auto", "embedding")
    assert cfg.data.play == "macbeth" and cfg.data.val_fraction == 0.1 and cfg.data.val_context == 50
    assert cfg.trainer.max_time == "00:00:10:00"


def test_seed_experiment_is_the_tutorial():
    cfg = compose_cfg("train", ["experiment=seed"])
    d, m = cfg.data, cfg.model
    assert (d.play, d.lowercase, d.seq_len, d.stride, d.layout, d.targets, d.batch_size) == (
        "macbeth", True, 50, 1, "windows", "last", 30,
    )  # fmt: skip
    assert (m.encoding, m.units, m.layers, m.dropout, m.optimizer, m.lr, m.weight_decay) == (
        "normalized", 300, 2, 0.2, "adam", 0.001, 0.0,
    )  # fmt: skip
    assert cfg.trainer.max_epochs == 100 and cfg.trainer.gradient_clip_val is None


def test_root_scripts_exist():
    root = Path(__file__).resolve().parents[1]
    assert 'run_command(__file__, "train", "charlstm.app.train:run")' in (root / "train.py").read_text()


def test_a_held_out_test_text_is_scored_once_on_the_best_checkpoint(make_cfg):
    from charlstm.app.evaluate import dataset_batches, score_batches
    from charlstm.core.checkpoint import build_net, load
    from charlstm.data.windows import WindowDataset

    metrics, objects = train(make_cfg("data.test_fraction=0.1", "trainer.max_epochs=2", "trainer.precision=32-true",
                                      "data.val_context=20"))  # fmt: skip
    dm, trainer = objects.datamodule, objects.trainer
    best = next(cb for cb in trainer.checkpoint_callbacks if getattr(cb, "best_model_path", ""))
    net = build_net(load(best.best_model_path))
    total, count = score_batches(
        net, dataset_batches(WindowDataset(dm.test_ids, 20), 512), net.encoding, len(dm.vocab), "cpu"
    )
    assert count == len(dm.test_ids) - 20
    assert abs(metrics["test/bpc"] - total / count / math.log(2)) < 1e-4
    assert "val/bpc" in metrics and metrics["test/bpc"] != metrics["val/bpc"]
    # the test text is neither trained on nor validated on
    train_b, test_b, val_b = (t.numpy().tobytes() for t in (dm.train_ids, dm.test_ids, dm.val_ids))
    assert test_b[:60] not in train_b and test_b[:60] not in val_b
