"""`python train.py -m ...`: every sweep job gets its own folder with checkpoints and TensorBoard events."""

import subprocess
import sys

import torch

from tests.conftest import ROOT, TINY


def test_multirun_gives_each_job_its_own_folder(tmp_path, data_dir):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *TINY, "model.units=8,12",
           "trainer.enable_progress_bar=false", "callbacks.text_sample=null", "sample.length=0",
           f"paths.outputs_root={tmp_path}", f"paths.data_dir={data_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "multirun").glob("*/*/*") if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job, units in zip(jobs, (8, 12), strict=True):
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        assert ckpt["hyper_parameters"]["units"] == units
        assert list((job / "tensorboard").glob("events.out.tfevents.*"))
        assert (job / "config.yaml").is_file()
