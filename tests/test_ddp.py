"""`trainer=ddp_cpu`: two CPU processes (gloo) train one model in one run folder (the one rank 0 claimed); rank 0
alone reports, logs and writes the checkpoints."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from charlstm.app.evaluate import dataset_batches, score_batches
from charlstm.core import checkpoint
from charlstm.core.checkpoint import build_net
from charlstm.data.windows import WindowDataset
from tests import forkserver
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_cpu_trains_in_one_folder_and_writes_one_checkpoint_set(tmp_path, data_dir):
    cmd = [
        sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *TINY, "trainer.enable_progress_bar=false",
        "sample.length=20", "data.test_fraction=0.10025", "trainer.precision=32-true", f"paths.outputs_root={tmp_path}",
        f"paths.data_dir={data_dir}", "trainer.enable_model_summary=true",
    ]  # fmt: skip
    done = forkserver.run(cmd, ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # one model line, from rank 0, saying how many processes train; no set-up banner from each rank
    models = [line for line in done.stdout.splitlines() if line.startswith("model: ")]
    assert len(models) == 1 and models[0].endswith("precision 32-true, 2 processes (DDPStrategy)"), models
    assert done.stdout.count("training: ") == 1
    assert "Initializing distributed" not in done.stdout and "distributed_backend" not in done.stdout
    assert done.stdout.count("run folder:") == 1  # the summary comes from rank 0 only
    assert not [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert (
        "sync_dist" not in done.stderr
    )  # the val/* and test/* logged are every rank's sums already (charlstm.app.logs)

    # the default run folder, outputs/<date>/<time>: rank 1 made no folder of its own
    folders = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    assert len(folders) == 1 and len(list(tmp_path.iterdir())) == 1
    run = folders[0]
    assert (run / "config.yaml").is_file() and (run / "train_ddp_process_1.log").is_file()
    ckpts = sorted(p.relative_to(run).as_posix() for p in tmp_path.rglob("*.ckpt"))
    assert len(ckpts) == 2 and "checkpoints/last.ckpt" in ckpts
    assert [c for c in ckpts if c.startswith("checkpoints/best-")]
    last = checkpoint.load(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] > 0 and last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert {e.parent for e in events} == {run}  # one log, written by rank 0 (fit, then test)

    # the held-out test text, split between the ranks, scores as one process scores it: every window once
    dm = instantiate(OmegaConf.load(run / "config.yaml").data, _convert_="all")
    dm.load()
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    net = build_net(checkpoint.load(best))
    context = dm.val_context
    total, count = score_batches(
        net, dataset_batches(WindowDataset(dm.test_ids, context), 512), net.encoding, len(dm.vocab), "cpu"
    )
    assert count % 2 == 1  # shares of unequal size: a padding sampler would score one window twice
    test_bpc = json.loads((run / "result.json").read_text())["metrics"]["test/bpc"]
    assert abs(test_bpc - total / count / math.log(2)) < 1e-4


@pytest.mark.slow
def test_ddp_cpu_in_a_local_sweep_trains_each_job_once_in_its_own_folder(tmp_path, data_dir):
    # Lightning starts rank 1 by running the command line again: it must run its job only, in the job's folder, with
    # the job's values as given (a prompt that needs quoting for Hydra, quoted once, on a text without quotes).
    sweep, text = tmp_path / "sweep", tmp_path / "asm.txt"
    text.write_text("".join(f"mov eax, [ebp-{i % 16}]; add ebx, 0x{i % 256:02x}\n" for i in range(200)))
    cmd = [
        sys.executable, str(ROOT / "train.py"), "-m", "trainer=ddp_cpu", *TINY, "model.units=8,12", "data=file",
        f"data.path={text}", "trainer.max_steps=3", "trainer.enable_progress_bar=false", "sample.length=5",
        "sample.prompt=mov eax, [", "callbacks.text_sample=null", f"paths.outputs_root={tmp_path}",
        f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", "trainer.enable_model_summary=true",
    ]  # fmt: skip
    done = forkserver.run(cmd, ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(", 2 processes (DDPStrategy)") == 2
    assert done.stdout.count("sweep summary (2 jobs") == 1  # rank 1 ran no sweep of its own
    assert done.stdout.count("\nmov eax, [") == 2  # each job's sample, from the prompt as given

    assert sorted(p.name for p in tmp_path.iterdir()) == ["asm.txt", "sweep"]  # no run folder beside the sweep
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_model.units=8", "1_model.units=12"]
    for job, units in zip(jobs, (8, 12), strict=True):
        assert [p.relative_to(sweep / job).as_posix() for p in (sweep / job).rglob("last.ckpt")] == [
            "checkpoints/last.ckpt"
        ]
        last = checkpoint.load(sweep / job / "checkpoints" / "last.ckpt")
        assert last["hyper_parameters"]["units"] == units and last["global_step"] == 3
        assert (sweep / job / "train_ddp_process_1.log").is_file()  # rank 1 ran in the job's folder
    with open(sweep / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["overrides"], r["state"]) for r in rows) == [("model.units=12", "complete"),
                                                                 ("model.units=8", "complete")]  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "env", "reruns"),
    [("ddp", {}, True), ("ddp_spawn", {}, False), ("ddp_fork", {}, False), ("auto", {}, False),
     ("ddp", {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "n1", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_ID": "1"}, False)],
)  # fmt: skip
def test_only_lightnings_script_launcher_is_taken_to_rerun_the_command_line(strategy, env, reruns, monkeypatch):
    """A sweep job's DDP ranks are pointed at the job (jobranks) only when Lightning re-runs the command line."""
    import pytorch_lightning as pl

    from charlstm.app.jobranks import starts_ranks

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    devices = 1 if strategy == "auto" else 2
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False)
    assert starts_ranks(trainer) is reruns
