"""seed=N with deterministic mode: two CPU runs log identical losses, step by step, and end with equal weights."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from charlstm.app.train import train


class RecordLosses(pl.Callback):
    """Keeps every training step's loss (the callback object is reachable from the run's objects)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def run(make_cfg, tmp_path, name: str, *overrides: str):
    cfg = make_cfg("trainer.deterministic=true", "trainer.max_epochs=2", "data.max_chars=2000", "sample.length=0",
                   "callbacks.early_stopping=null", *overrides)  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.callbacks.record = {"_target_": f"{__name__}.RecordLosses"}
        cfg.callbacks.pop("text_sample", None)  # saves time; sampling is seeded on its own
    metrics, objects = train(cfg)
    record = next(cb for cb in objects.callbacks if isinstance(cb, RecordLosses))
    return record.losses, metrics, objects.model.state_dict()


@pytest.mark.parametrize("layout", ["windows", "streams"])
def test_same_seed_same_losses_and_weights(make_cfg, tmp_path, layout):
    extra = ("data.layout=streams", "data.batch_size=4", "data.seq_len=20") if layout == "streams" else ()
    losses_a, metrics_a, weights_a = run(make_cfg, tmp_path, "a", "seed=7", *extra)
    losses_b, metrics_b, weights_b = run(make_cfg, tmp_path, "b", "seed=7", *extra)
    assert len(losses_a) > 10
    assert losses_a == losses_b  # exactly, step by step
    assert metrics_a["val/loss"] == metrics_b["val/loss"]
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name

    losses_c, _, _ = run(make_cfg, tmp_path, "c", "seed=8", *extra)
    assert losses_c != losses_a  # the seed is what made them equal


def test_loader_workers_read_the_same_batches_as_the_main_process(make_cfg, tmp_path):
    """data.num_workers=2: windows gathered by two worker processes (from the mapped corpus), in the order the main
    process's shuffle gives: the same seeded run, step by step."""
    losses_a, metrics_a, _ = run(make_cfg, tmp_path, "a", "seed=7")
    losses_b, metrics_b, _ = run(make_cfg, tmp_path, "b", "seed=7", "data.num_workers=2")
    assert len(losses_a) > 10 and losses_a == losses_b
    assert metrics_a["val/loss"] == metrics_b["val/loss"]
