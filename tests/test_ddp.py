"""`trainer=ddp_cpu`: two CPU processes (gloo) train one model in one run folder (the one rank 0 claimed); rank 0
alone reports, logs and writes the checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charlstm import checkpoint
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_cpu_trains_in_one_folder_and_writes_one_checkpoint_set(tmp_path, data_dir):
    cmd = [
        sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *TINY, "trainer.enable_progress_bar=false",
        "sample.length=20", f"paths.outputs_root={tmp_path}", f"paths.data_dir={data_dir}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "All distributed processes registered. Starting with 2 processes" in done.stdout
    assert done.stdout.count("run folder:") == 1  # the summary comes from rank 0 only
    assert not [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback"))]

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
    assert [e.parent for e in events] == [run / "tensorboard"]  # one log, written by rank 0
