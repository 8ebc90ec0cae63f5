"""Resume inside an epoch: the resumed run trains the rest of that epoch, batch for batch as a run that never stopped
(same losses step by step, same weights at the end), numbers its epochs as that run does, and Lightning has no
"not resumable" loader to warn about. Windows and streams layouts, one process and DDP."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from torch.utils.data import SequentialSampler

from charlstm.app.train import train
from charlstm.core import checkpoint
from charlstm.core.errors import TrainingInterrupted
from charlstm.data.windows import ResumableLoader, ShuffledWindows, StreamDataset, WindowDataset, as_batch
from charlstm.training.datamodule import STREAMS_KEY, CharDataModule, own_stream_state
from tests import forkserver
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
EXACT = ("trainer.deterministic=true", "sample.length=0", "data.max_chars=2000", "trainer.max_epochs=2")
LAYOUTS = {
    "windows": ("data.layout=windows",),  # shuffled, dropout 0.2 (the default model)
    "streams": ("data.layout=streams", "data.batch_size=4", "data.seq_len=20"),  # in order, hidden state carried
}
NOT_RESUMABLE = "your dataloader is not resumable"


class Steps(pl.Callback):
    """Every training step: (global step after it, epoch, batch index, loss, a checksum of the batch's targets)."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"])
        self.rows.append((trainer.global_step, trainer.current_epoch, batch_idx, loss, int(batch[1].sum())))


def run(make_cfg, folder: Path, *overrides: str, **callbacks) -> tuple[dict, list[tuple], list[str]]:
    """Train in ``folder``; returns the objects, the steps taken and the texts of the warnings raised."""
    cfg = make_cfg(*EXACT, *overrides)
    with open_dict(cfg):
        cfg.callbacks.pop("text_sample", None)
        cfg.paths.output_dir, cfg.paths.outputs_root = str(folder / "run"), str(folder)
        cfg.callbacks.steps = {"_target_": f"{__name__}.Steps"}
        cfg.callbacks.update(callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, objects = train(cfg)
    steps = next(cb for cb in objects.callbacks if isinstance(cb, Steps))
    return objects, steps.rows, [str(w.message) for w in caught]


def assert_same_weights(a: dict, b: dict) -> None:
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        if name != "best_val_loss":  # the stopped run validated once more (at its stop)
            assert torch.equal(wa[name], wb[name]), name
    oa, ob = a.trainer.optimizers[0].state_dict(), b.trainer.optimizers[0].state_dict()
    for i, state in oa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ob["state"][i][key]), (i, key)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_run_stopped_inside_an_epoch_trains_the_rest_of_it_when_resumed(make_cfg, tmp_path, caplog, layout):
    recipe = LAYOUTS[layout]
    a, a_steps, _ = run(make_cfg, tmp_path / "a", *recipe)
    n = a.trainer.num_training_batches
    assert n > 20 and a.trainer.global_step == 2 * n

    # stopped by trainer.max_steps at step 20 of the first epoch, then resumed without the limit
    b_dir = tmp_path / "b"
    run(make_cfg, b_dir, *recipe, "trainer.max_steps=20")
    stopped = checkpoint.load(b_dir / "run" / "checkpoints" / "last.ckpt")
    assert (stopped["global_step"], stopped["epoch"]) == (20, 0)  # inside epoch 0, not after it
    caplog.set_level(logging.INFO, logger="charlstm")
    b, b_steps, b_warnings = run(make_cfg, b_dir, *recipe, "trainer.max_steps=-1", "ckpt_path=last")

    assert b.trainer.global_step == 2 * n and b.trainer.current_epoch == 2
    assert b_steps == a_steps[20:]  # the same batches in the same order, the same losses, the same epoch numbers
    assert [epoch for _, epoch, *_ in b_steps] == [(step - 1) // n for step, *_ in b_steps]
    assert_same_weights(a, b)
    assert f"validation at step {n} (epoch 0)" in caplog.text and f"validation at step {2 * n} (epoch 1)" in caplog.text
    assert not [w for w in b_warnings if NOT_RESUMABLE in w]
    if layout == "streams":  # the carried hidden state went into the checkpoint: one row per process
        h, c = stopped[STREAMS_KEY]
        assert h.shape == c.shape == (1, 2, 4, 16)


@pytest.mark.parametrize("layout", [*LAYOUTS, "windows-workers"])
def test_a_checkpoint_written_inside_an_epoch_resumes_at_its_batch_without_lightnings_warning(
    make_cfg, tmp_path, layout
):
    recipe = (*LAYOUTS["windows"], "data.num_workers=2") if layout == "windows-workers" else LAYOUTS[layout]
    copy = tmp_path / "step-7.ckpt"
    saver = {"_target_": "tests.test_resume.CopyCheckpoint", "step": 7, "dst": str(copy),
             "src": str(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt")}  # fmt: skip
    a, a_steps, _ = run(
        make_cfg, tmp_path / "a", *recipe, "callbacks.last_checkpoint.every_n_train_steps=7", copy=saver
    )
    # the training loader's state, saved by Lightning: its position in the epoch and (windows) the epoch's shuffle
    (state,) = checkpoint.load(copy)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["batches"] == 7 and isinstance(state["epoch_seed"], int) == layout.startswith("windows")
    b, b_steps, b_warnings = run(make_cfg, tmp_path / "b", *recipe, f"ckpt_path={copy}")
    assert b_steps == a_steps[7:]
    assert_same_weights(a, b)
    assert not [w for w in b_warnings if NOT_RESUMABLE in w]


# -- the loader on its own -------------------------------------------------------------------------------------


def windows_loader(n: int = 103, batch_size: int = 10, rank: int = 0, world: int = 1, seed: int | None = None):
    ds = WindowDataset(torch.arange(n + 4), seq_len=4)
    sampler = ShuffledWindows(len(ds), rank, world, seed)
    return ResumableLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=as_batch)


def batches(loader, count: int | None = None) -> list[list[int]]:
    out = []
    for x, _ in loader:
        out.append(x[:, 0].tolist())
        if count is not None and len(out) == count:
            break
    return out


@pytest.mark.parametrize(("rank", "world", "seed"), [(0, 1, None), (1, 2, 99)])
def test_a_resumed_windows_loader_reads_the_rest_of_the_epoch_then_the_same_next_epochs(rank, world, seed):
    torch.manual_seed(0)
    whole = windows_loader(rank=rank, world=world, seed=seed)
    epoch0 = batches(whole)
    whole.sampler.set_epoch(1)
    epoch1 = batches(whole)

    torch.manual_seed(0)
    stopped = windows_loader(rank=rank, world=world, seed=seed)
    assert batches(stopped, 3) == epoch0[:3]
    state = stopped.state_dict()
    assert state["batches"] == 3

    resumed = windows_loader(rank=rank, world=world, seed=seed)  # a new process (DDP: the seed from the checkpoint)
    torch.manual_seed(1)  # whatever the generator holds: the epoch's own shuffle seed is in the state
    resumed.load_state_dict(state)
    assert batches(resumed) == epoch0[3:]
    assert resumed.state_dict()["batches"] == len(epoch0)
    resumed.sampler.set_epoch(1)
    if seed is not None:
        assert batches(resumed) == epoch1
    else:  # the next epoch draws a new shuffle, as any epoch does
        assert len(batches(resumed)) == len(epoch1)


def test_a_resumed_pass_leaves_torchs_generator_where_the_checkpoint_left_it():
    torch.manual_seed(0)
    stopped = windows_loader()
    batches(stopped, 2)
    state = stopped.state_dict()

    resumed = windows_loader()
    resumed.load_state_dict(state)
    restored = torch.get_rng_state()  # as the checkpoint left it
    iterator = iter(resumed)  # a pass draws its base seed
    next(iterator)
    assert torch.equal(torch.get_rng_state(), restored)


def test_a_resumed_streams_loader_reads_the_rest_of_the_epoch_then_starts_at_the_top():
    ds = StreamDataset(torch.arange(200), batch_size=3, seq_len=5)
    whole = [x.tolist() for x, _ in ResumableLoader(ds, batch_size=None)]
    stopped = ResumableLoader(ds, batch_size=None)
    for i, _ in enumerate(stopped):
        if i == 4:
            break
    resumed = ResumableLoader(StreamDataset(torch.arange(200), batch_size=3, seq_len=5), batch_size=None)
    resumed.load_state_dict(stopped.state_dict())
    assert [x.tolist() for x, _ in resumed] == whole[5:]
    assert [x.tolist() for x, _ in resumed] == whole  # the next epoch reads the text from the top


def test_a_resumed_loader_with_another_sampler_skips_the_batches_read():
    # overfit_batches: Lightning puts in a SequentialSampler
    ds = WindowDataset(torch.arange(50), seq_len=4)
    stopped = ResumableLoader(ds, batch_size=8, sampler=SequentialSampler(ds), collate_fn=as_batch)
    assert len(batches(stopped, 2)) == 2
    resumed = ResumableLoader(ds, batch_size=8, sampler=SequentialSampler(ds), collate_fn=as_batch)
    resumed.load_state_dict(stopped.state_dict())
    assert batches(resumed) == [list(range(i, min(i + 8, len(ds)))) for i in range(16, len(ds), 8)]


def test_a_streams_state_saved_by_another_number_of_processes_is_not_carried_on():
    class Module:  # what own_stream_state reads of a LightningModule
        def __init__(self, rank: int, world: int) -> None:
            self.trainer = type("T", (), {"global_rank": rank, "world_size": world})()

    h, c = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    mine = own_stream_state(Module(1, 2), (h, c))
    assert torch.equal(mine[0], h[1]) and torch.equal(mine[1], c[1])
    assert own_stream_state(Module(0, 1), (h, c)) is None  # two processes' streams: other text, start from zeros
    assert own_stream_state(Module(0, 1), None) is None


def test_validation_draws_nothing_from_torchs_generator(tmp_path, text_file):
    dm = CharDataModule(source="file", path=str(text_file("a dagger I see before me. " * 40)), data_dir=str(tmp_path),
                        seq_len=8, batch_size=4, val_batch_size=16)  # fmt: skip
    dm.setup("fit")
    state = torch.get_rng_state()
    assert sum(len(x) for x, _ in dm.val_dataloader()) > 16
    assert torch.equal(torch.get_rng_state(), state)


# -- DDP: two CPU processes ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ddp_cpu_resumed_inside_an_epoch_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, data_dir, layout):
    base = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", "trainer.enable_progress_bar=false",
            f"paths.data_dir={data_dir}"]  # fmt: skip
    recipe = [*TINY, *EXACT, *LAYOUTS[layout], "callbacks.text_sample=null"]
    ends = []
    for name, steps in (("a", [[]]), ("b", [["trainer.max_steps=5"], ["trainer.max_steps=-1", "ckpt_path=last"]])):
        for i, extra in enumerate(steps):
            args = [*base, *([] if "ckpt_path=last" in extra else recipe), *extra,
                    f"paths.outputs_root={tmp_path / name}", f"hydra.run.dir={tmp_path / name / str(i)}"]  # fmt: skip
            done = forkserver.run(args, ROOT, timeout=300)
            assert done.returncode == 0, done.stderr[-4000:]
            assert NOT_RESUMABLE not in done.stderr
        ends.append(checkpoint.load(tmp_path / name / "0" / "checkpoints" / "last.ckpt"))
    a, b = ends
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"])
    for name, value in a["state_dict"].items():
        if name != "best_val_loss":
            assert torch.equal(value, b["state_dict"][name]), name


@pytest.mark.parametrize(
    ("layout", "limit"), [("windows", None), ("windows", 9), ("streams", None)], ids=["windows", "limit", "streams"]
)
def test_ctrl_c_on_an_epochs_last_batch_resumes_with_the_next_epoch_whole(make_cfg, tmp_path, layout, limit):
    recipe = (*LAYOUTS[layout], *([f"trainer.limit_train_batches={limit}"] if limit else []))
    a, a_steps, _ = run(make_cfg, tmp_path / "a", *recipe)
    n = a.trainer.num_training_batches
    signal = {"_target_": "tests.test_interrupt.SendSignal", "step": n, "signum": 2}
    with pytest.raises(TrainingInterrupted):
        run(make_cfg, tmp_path / "b", *recipe, signal=signal)
    assert checkpoint.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt")["global_step"] == n
    b, b_steps, _ = run(make_cfg, tmp_path / "b", *recipe, "ckpt_path=last")
    assert b_steps == a_steps[n:] and len(b_steps) == n
    assert_same_weights(a, b)
