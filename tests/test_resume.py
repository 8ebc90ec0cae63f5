"""Resume: a run continued from a checkpoint ends with exactly the weights of one that never stopped, goes on in
the same run folder and TensorBoard log, and refuses a checkpoint of another vocabulary or model shape."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from charlstm.app.train import train
from charlstm.core import checkpoint
from charlstm.core.errors import CheckpointError, ConfigError, TrainingInterrupted

EXACT = ("trainer.deterministic=true", "sample.length=0", "data.max_chars=2000")


class CopyCheckpoint(pl.Callback):
    """Copies the run's last.ckpt as it is when epoch ``epoch`` starts (the previous epoch's end state), or when step
    ``step`` begins (written there by a periodic save inside the epoch)."""

    def __init__(self, src: str, dst: str, epoch: int | None = None, step: int | None = None) -> None:
        self.src, self.dst, self.epoch, self.step = src, dst, epoch, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = trainer.current_epoch if self.epoch is not None else trainer.global_step
        if now == (self.epoch if self.epoch is not None else self.step) and not Path(self.dst).exists():
            shutil.copy(self.src, self.dst)


def copy_at_epoch_start(cfg, folder: Path, epoch_end: Path) -> None:
    """Have the run in ``folder`` copy its last.ckpt to ``epoch_end`` as its second epoch starts (the state a crash
    right after the first epoch would leave)."""
    with open_dict(cfg):
        cfg.callbacks.copy = {"_target_": "tests.test_resume.CopyCheckpoint", "epoch": 1, "dst": str(epoch_end),
                              "src": str(folder / "run" / "checkpoints" / "last.ckpt")}  # fmt: skip


def cfg_in(make_cfg, folder: Path, *overrides: str):
    cfg = make_cfg(*EXACT, *overrides)
    with open_dict(cfg):
        cfg.callbacks.pop("text_sample", None)  # samples each epoch: time, and nothing to do with resuming
        cfg.paths.output_dir = str(folder / "run")
        cfg.paths.outputs_root = str(folder)
    return cfg


def assert_same_state(a: dict, b: dict) -> None:
    """Everything a run ends with: weights, optimizer and scheduler state, loop position, best-metric tracking."""
    ta, tb = a.trainer, b.trainer
    assert (ta.global_step, ta.current_epoch) == (tb.global_step, tb.current_epoch)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    oa, ob = ta.optimizers[0].state_dict(), tb.optimizers[0].state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for i, state in oa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ob["state"][i][key]), (i, key)
    sa = [c.scheduler.state_dict() for c in ta.lr_scheduler_configs]
    sb = [c.scheduler.state_dict() for c in tb.lr_scheduler_configs]
    assert sa == sb
    ca = next(cb for cb in ta.callbacks if isinstance(cb, ModelCheckpoint))
    cb_ = next(cb for cb in tb.callbacks if isinstance(cb, ModelCheckpoint))
    assert torch.equal(ca.best_model_score, cb_.best_model_score)
    assert Path(ca.best_model_path).name == Path(cb_.best_model_path).name


@pytest.mark.parametrize(
    ("recipe", "extend"),
    [
        # shuffled windows, dropout and a plateau schedule that steps after every epoch
        (("data.layout=windows", "model.scheduler=plateau", "model.plateau_patience=0", "model.lr=0.05"), True),
        # streams carry the hidden state across batches; the cosine schedule (stepped every batch) spans
        # trainer.max_epochs, so only a run resumed with the same max_epochs can match
        (("data.layout=streams", "data.batch_size=4", "data.seq_len=20", "model.scheduler=cosine"), False),
    ],
    ids=["windows", "streams"],
)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(make_cfg, tmp_path, recipe, extend):
    # A: 3 epochs without a stop; a copy of last.ckpt is taken at the end of its first epoch
    epoch_end = tmp_path / "epoch-end.ckpt"
    cfg = cfg_in(make_cfg, tmp_path / "a", *recipe, "trainer.max_epochs=3")
    copy_at_epoch_start(cfg, tmp_path / "a", epoch_end)
    _, a = train(cfg)

    # B: from A's end-of-epoch checkpoint (written mid-run, as a crash would leave it) to 3 epochs
    _, b = train(cfg_in(make_cfg, tmp_path / "b", *recipe, "trainer.max_epochs=3", f"ckpt_path={epoch_end}"))
    assert_same_state(a, b)

    if extend:  # C: a finished 1-epoch run extended to 3 with `ckpt_path=last`
        train(cfg_in(make_cfg, tmp_path / "c", *recipe, "trainer.max_epochs=1"))
        _, c = train(cfg_in(make_cfg, tmp_path / "c", *recipe, "trainer.max_epochs=3", "ckpt_path=last"))
        assert_same_state(a, c)


def scalars(folder: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [event.step for event in acc.Scalars(tag)]


def test_resume_after_a_crash_continues_in_the_same_run_folder_and_tensorboard_log(make_cfg, tmp_path):
    # Logs every step, saves every 10; a double Ctrl-C at step 33 quits without saving, like a crash: the log
    # then runs 3 steps past the newest checkpoint (step 30).
    base = ("trainer.log_every_n_steps=1", "callbacks.last_checkpoint.every_n_train_steps=10", "sample.length=0")
    cfg = make_cfg(*base, "trainer.max_epochs=2")
    with open_dict(cfg):
        cfg.callbacks.send_signal = {"_target_": "tests.test_interrupt.SendSignal", "step": 33, "signum": 2, "times": 2}
    with pytest.raises(TrainingInterrupted, match="stopped without saving"):
        train(cfg)
    run = tmp_path / "run"
    assert checkpoint.load(run / "checkpoints" / "last.ckpt")["global_step"] == 30
    assert max(scalars(run, "train/loss")) > 30

    _, objects = train(make_cfg(*base, "trainer.max_epochs=2", "ckpt_path=last"))
    assert objects.output_dir == run
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoints"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # one log, two sessions
    # the steps logged after the checkpoint by the first session are hidden: one curve, every step once
    steps = scalars(run, "train/loss")  # at the steps done: 1, 2, ...
    assert steps == list(range(1, objects.trainer.global_step + 1))
    assert (run / "config.yaml").is_file() and (run / "config-resume-1.yaml").is_file()
    assert OmegaConf.load(run / "config-resume-1.yaml").ckpt_path == "last"


# -- refusals, each one line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Path:
    """A tiny 1-epoch run's last.ckpt."""
    from tests.conftest import TINY, compose_cfg

    tmp = tmp_path_factory.mktemp("finished")
    cfg = compose_cfg("train", [*TINY, "sample.length=0"])
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.outputs_root, cfg.paths.data_dir = str(tmp / "run"), str(tmp), str(data_dir)
    train(cfg)
    return tmp / "run" / "checkpoints" / "last.ckpt"


def test_resume_refuses_a_checkpoint_of_another_vocabulary(make_cfg, finished):
    with pytest.raises(CheckpointError) as info:
        train(make_cfg("data.lowercase=false", "trainer.max_epochs=2", f"ckpt_path={finished}"))
    assert str(info.value).startswith(f"checkpoint {finished} was trained on another vocabulary (")
    assert str(info.value).endswith(
        "resume with the same data settings or start a new run without ckpt_path"
    ) and "differing chars: 'A'" in str(info.value)


def test_resume_refuses_a_checkpoint_of_another_model_shape(make_cfg, finished):
    with pytest.raises(CheckpointError) as info:
        train(make_cfg("model.units=8", "trainer.max_epochs=2", f"ckpt_path={finished}"))
    assert str(info.value) == (
        f"checkpoint {finished} has model.units=16 but this run has model.units=8; "
        "resume with model.units=16 or start a new run without ckpt_path"
    )


def test_resume_of_a_finished_run_asks_for_more_epochs(make_cfg, finished):
    with pytest.raises(ConfigError) as info:
        train(make_cfg("trainer.max_epochs=1", f"ckpt_path={finished}"))
    assert str(info.value) == (
        f"checkpoint {finished} has already trained 1 epoch(s) and trainer.max_epochs=1; "
        "raise it to continue, e.g. trainer.max_epochs=2"
    )


def test_resume_refuses_missing_and_corrupt_checkpoints(make_cfg, tmp_path, finished):
    with pytest.raises(CheckpointError) as info:
        train(make_cfg("trainer.max_epochs=2", "ckpt_path=last"))  # outputs_root=tmp_path holds no run
    assert str(info.value) == f"no last.ckpt under {tmp_path}/; train a model first (make train) or pass ckpt_path=PATH"

    with pytest.raises(CheckpointError) as info:
        train(make_cfg("trainer.max_epochs=2", f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    assert str(info.value).startswith(f"checkpoint {tmp_path / 'nope.ckpt'} does not exist")

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(finished.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as info:
        train(make_cfg("trainer.max_epochs=2", f"ckpt_path={cut}"))
    assert str(info.value).startswith(f"checkpoint {cut.resolve()} is ") and "truncated" in str(info.value)


def test_checkpoint_outside_a_run_folder_resumes_into_a_new_one(make_cfg, tmp_path, finished):
    loose = tmp_path / "elsewhere" / "model.ckpt"
    loose.parent.mkdir()
    shutil.copy(finished, loose)
    _, objects = train(make_cfg("trainer.max_epochs=2", f"ckpt_path={loose}", "sample.length=0"))
    assert objects.output_dir == tmp_path / "run"
    assert objects.trainer.current_epoch == 2
    assert sorted(p.name for p in loose.parent.iterdir()) == ["model.ckpt"]  # nothing written beside it
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] > 0


@pytest.mark.parametrize("scheduler", ["none", "cosine"])
def test_a_resume_with_another_learning_rate_scales_the_restored_optimizer(make_cfg, tmp_path, scheduler):
    # A: 2 epochs at lr 0.01, its end-of-epoch-1 state copied; B: from that state, the second epoch at lr 0.005
    epoch_end = tmp_path / "epoch-end.ckpt"
    recipe = (f"model.scheduler={scheduler}", "trainer.max_epochs=2")
    cfg = cfg_in(make_cfg, tmp_path / "a", *recipe, "model.lr=0.01")
    copy_at_epoch_start(cfg, tmp_path / "a", epoch_end)
    _, a = train(cfg)
    _, b = train(cfg_in(make_cfg, tmp_path / "b", *recipe, "model.lr=0.005", f"ckpt_path={epoch_end}"))
    opt_a, opt_b = a.trainer.optimizers[0], b.trainer.optimizers[0]
    assert b.trainer.global_step == a.trainer.global_step
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
        # the same point of the schedule, at half the rate
        assert group_b["lr"] == pytest.approx(group_a["lr"] / 2, rel=1e-9)
    if scheduler == "none":
        assert [g["lr"] for g in opt_b.param_groups] == [0.005, 0.005]
    else:
        assert b.trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([0.005, 0.005])
        assert opt_b.param_groups[0]["lr"] < 0.005  # decayed from the new peak


def test_config_yaml_is_written_whole_or_not_at_all(make_cfg, tmp_path, monkeypatch):
    from charlstm.app.runconfig import save_run_config
    from charlstm.core import fileio

    cfg = make_cfg()
    run = tmp_path / "run"
    save_run_config(cfg, run, None, 0)
    first = (run / "config.yaml").read_bytes()

    def fail(src, dst):  # a crash at the moment of the rename
        raise OSError("disk gone")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with open_dict(cfg):
        cfg.model.units = 999
    with pytest.raises(OSError, match="disk gone"):
        save_run_config(cfg, run, None, 0)
    assert (run / "config.yaml").read_bytes() == first  # the old file, whole
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # no temporary left behind


class PlateauModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss)
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                                                   "monitor": "loss"}}  # fmt: skip


@pytest.mark.parametrize(
    ("limits", "pending"),
    [({"max_epochs": 1}, 1), ({"max_epochs": 1, "limit_train_batches": 2}, 1), ({"max_steps": 3}, 0)],
    ids=["whole-epoch", "limit_train_batches", "stopped-inside-the-epoch"],
)
def test_the_plateau_step_carried_in_an_epoch_end_checkpoint_is_the_one_lightning_takes(limits, pending):
    """An epoch-end checkpoint carries the ReduceLROnPlateau step Lightning takes after the hook: only after an
    epoch that ran to its last batch (limit_train_batches counts as the end), not when max_steps stops inside it."""
    from charlstm.app.reliability import pending_plateau_steps

    seen = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(pending_plateau_steps(trainer))

    trainer = pl.Trainer(callbacks=[Record()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **limits)  # fmt: skip
    trainer.fit(PlateauModule())
    assert len(seen) == 1 and len(seen[0]) == pending
    if pending:
        assert seen[0][0] == (0, pytest.approx(float(trainer.callback_metrics["loss"])))
