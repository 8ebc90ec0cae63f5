"""Clusters: hydra/launcher=submitit_slurm sends one SLURM job per Hydra job, sized to the trainer (checked up to the
sbatch script, without SLURM); the requeue signal saves last.ckpt at a step boundary and requeues; a requeued job
resumes from it in the same run folder; hydra/launcher=submitit_local runs the same path here, for real."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from charlstm.app.cli import command_line
from charlstm.app.cluster import REQUEUE_ENV, check_allocation, hand_over, requeued_checkpoint
from charlstm.app.train import train
from charlstm.core import checkpoint
from charlstm.core.errors import ConfigError, JobFailed, TrainingInterrupted, process_rank
from tests import forkserver
from tests.cli import ROOT, ok, one_line_error, run_cli, run_folders
from tests.conftest import TINY
from tests.test_interrupt import SendSignal, add_callback

SLURM_YAML = OmegaConf.load(ROOT / "configs" / "hydra" / "launcher" / "submitit_slurm.yaml")


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, flags=re.MULTILINE))


# -- SLURM, up to the sbatch call --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_slurm_sweep_sends_one_ddp_job_per_point_sized_to_the_trainer(tmp_path):
    out = tmp_path / "submitted.json"
    args = ["-m", "hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.num_nodes=2", "model.units=128,256",
            "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    env = {**os.environ, "DRY_SUBMIT_OUT": str(out)}
    done = forkserver.run([sys.executable, str(ROOT / "tests" / "dry_submit.py"), *args], tmp_path, env, 120)
    ok(done)
    sent = json.loads(out.read_text())
    assert sent["executor"] == "SlurmExecutor" and sent["launcher"] == "SlurmLauncher"
    jobs = sent["jobs"]
    assert [j["config"]["model"]["units"] for j in jobs] == [128, 256]
    assert [Path(j["folder"]) for j in jobs] == [tmp_path / "sweep" / "0_model.units=128",
                                                 tmp_path / "sweep" / "1_model.units=256"]  # fmt: skip
    trainer = jobs[0]["config"]["trainer"]
    assert (trainer["strategy"], trainer["accelerator"], trainer["num_nodes"]) == ("ddp", "gpu", 2)
    # one sbatch array: each element one Lightning run, one task per GPU on each of the trainer's nodes
    options = sbatch_options(sent["script"])
    assert options["array"].startswith("0-1")
    assert options["nodes"] == str(trainer["num_nodes"])
    assert options["ntasks-per-node"] == options["gpus-per-node"] == str(trainer["devices"])
    assert options["partition"] == "gpu"
    assert options["time"] == str(SLURM_YAML.timeout_min)
    assert options["signal"] == f"USR2@{SLURM_YAML.signal_delay_s}"  # the requeue signal, before the time limit
    assert sent["max_num_timeout"] == SLURM_YAML.max_num_timeout
    assert "srun" in sent["script"] and "submitit.core._submit" in sent["script"]


def test_the_slurm_launcher_on_a_machine_without_slurm_is_one_line(tmp_path):
    done = run_cli("train.py", "-m", "hydra/launcher=submitit_slurm", "trainer=ddp", cwd=tmp_path, timeout=120)
    line = one_line_error(done)
    assert line.startswith("error: hydra/launcher=submitit_slurm submits to SLURM, which this machine lacks")
    assert not list(tmp_path.iterdir())  # no sweep folder left behind


def test_a_launcher_without_multirun_is_one_line(tmp_path):
    line = one_line_error(run_cli("train.py", "hydra/launcher=submitit_local", "model.units=8", cwd=tmp_path))
    assert line == (  # the command to type instead, runnable as printed (this interpreter, the script's path)
        "error: hydra/launcher=submitit_local applies to -m runs only (Hydra launches multiruns; one job is fine): "
        f"{sys.executable} {ROOT / 'train.py'} -m hydra/launcher=submitit_local model.units=8"
    )


def test_a_job_sized_apart_from_its_allocation_is_one_line(monkeypatch):
    trainer = OmegaConf.create({"devices": 2, "num_nodes": 2})
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    with pytest.raises(ConfigError, match=r"^trainer\.devices=2 but this SLURM job runs 1 task\(s\) per node; "):
        check_allocation(trainer)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_NNODES", "1")
    with pytest.raises(ConfigError, match=r"^trainer\.num_nodes=2 but this SLURM job has 1 node\(s\); "):
        check_allocation(trainer)
    monkeypatch.setenv("SLURM_NNODES", "2")
    check_allocation(trainer)


def test_ranks_started_by_srun_are_known(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert process_rank() == 0  # one task: a batch script's own process, whatever starts under it
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert process_rank() == 3
    monkeypatch.setenv("RANK", "1")
    assert process_rank() == 1


# -- the requeue signal, in process ------------------------------------------------------------------------


class CountSteps(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps += 1


def requeue_cfg(make_cfg):
    """One job's config, as submitit would start it each time: a requeue signal arrives after step 7."""
    cfg = make_cfg("trainer.max_steps=12", "sample.length=0", "callbacks.last_checkpoint.every_n_train_steps=5")
    add_callback(cfg, "send_signal", SendSignal, step=7, signum=int(signal.SIGUSR2))
    add_callback(cfg, "count", CountSteps)
    return cfg


def test_the_requeue_signal_saves_at_a_step_boundary_requeues_and_the_requeued_job_resumes(
    make_cfg, tmp_path, monkeypatch
):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    handed: list[tuple[int, int]] = []

    def submitit_handler(signum, frame):  # what submitit installs: requeue the job, then exit
        handed.append((signum, checkpoint.load(last)["global_step"]))
        sys.exit(144)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.delenv(REQUEUE_ENV, raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(TrainingInterrupted) as info:
            train(requeue_cfg(make_cfg))
        assert str(info.value) == f"SIGUSR2 at epoch 0, step 7: saved {last}; the job is requeued and resumes from it"
        assert info.value.exit_code == 144  # submitit's own status: its local runner starts the job again on it
        assert handed == [(signal.SIGUSR2, 7)]  # handed over once, after the batch in flight was saved
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler

        monkeypatch.setenv(REQUEUE_ENV, "1")  # what the launcher sets when submitit starts the job again
        _, objects = train(requeue_cfg(make_cfg))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    trainer = objects.trainer
    assert objects.output_dir == tmp_path / "run"
    assert trainer.global_step == 12 == checkpoint.load(last)["global_step"]
    counted = next(cb for cb in objects.callbacks if isinstance(cb, CountSteps))
    assert counted.steps == 12 - 7  # nothing trained twice
    assert OmegaConf.load(tmp_path / "run" / "config-resume-1.yaml").ckpt_path == str(last)
    assert handed == [(signal.SIGUSR2, 7)]


def test_outside_a_submitit_job_the_requeue_signal_is_left_alone(make_cfg, monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        cfg = make_cfg("trainer.max_steps=10", "sample.length=0")
        add_callback(cfg, "send_signal", SendSignal, step=3, signum=int(signal.SIGUSR2))
        _, objects = train(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [signal.SIGUSR2] and objects.trainer.global_step == 10


def test_what_the_requeue_hand_over_says(tmp_path):
    ckpt = tmp_path / "last.ckpt"

    def refuses(signum, frame):
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    resume = command_line("train.py", f"ckpt_path={ckpt}")
    assert hand_over(refuses, signal.SIGUSR2, ckpt) == (
        f"not requeued (Job not requeued because: timed-out too many times); resume with: {resume}",
        None,
    )
    assert hand_over(lambda signum, frame: None, signal.SIGUSR2, ckpt) == ("the job's first process requeues it", None)
    assert hand_over(None, signal.SIGUSR2, ckpt) == (f"resume with: {resume}", None)


def test_only_a_requeued_job_resumes_and_only_from_its_own_run_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    monkeypatch.delenv(REQUEUE_ENV, raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeued_checkpoint(run) is None  # a first start: a reused folder is not resumed on its own
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued it (preemption, node failure)
    assert requeued_checkpoint(run) is None  # no config.yaml: not a run folder
    (run / "config.yaml").write_text("{}")
    assert requeued_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    assert requeued_checkpoint(tmp_path / "other") is None


class FailedJob:
    """A submitted job that ended without a result, as submitit reports it."""

    def __init__(self, folder: Path, num: int, lines: str) -> None:
        import submitit

        self.paths = submitit.core.utils.JobPaths(folder, job_id=str(100 + num), task_id=0)
        self.paths.stderr.parent.mkdir(parents=True, exist_ok=True)
        self.paths.stderr.write_text(lines)

    def results(self):
        import submitit

        raise submitit.core.utils.UncompletedJobError("has not produced any output")


def test_a_job_that_failed_is_one_line_naming_it_and_its_log(tmp_path, monkeypatch):
    import submitit

    from hydra_plugins.charlstm_launcher.launchers import LocalLauncher

    folder = tmp_path / ".submitit" / "%j"
    jobs = [FailedJob(folder, 0, "warning: something\nerror: model.units=0 is not allowed: it must be >= 1\n"),
            FailedJob(folder, 1, "Traceback (most recent call last):\nKeyError: 'x'\n")]  # fmt: skip
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, fn, *it: jobs)
    launcher = LocalLauncher(submitit_folder=str(folder), tasks_per_node=1, timeout_min=1)
    launcher.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(JobFailed) as info:
        launcher.launch([["model.units=0"], ["model.units=8"]], initial_job_idx=0)
    assert str(info.value) == (
        f"job #0 (model.units=0) failed: model.units=0 is not allowed: it must be >= 1 (log: {jobs[0].paths.stderr}); "
        "1 more failed, their logs are beside it"
    )


def test_a_job_runs_in_the_folder_claimed_when_it_was_submitted_also_when_requeued(tmp_path, monkeypatch):
    import submitit
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from charlstm.app import rundir
    from hydra_plugins.charlstm_launcher.launchers import LocalLauncher

    submitted = []

    def submit(self, fn, *iterables):
        submitted.extend(zip(*iterables, strict=True))
        return [SimpleNamespace(results=lambda: [None], paths=SimpleNamespace(stdout="x")) for _ in submitted]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    monkeypatch.setenv(rundir.FIXED_ENV, "[]")
    sweep = tmp_path / "it's a sweep"
    (sweep / "1_model.units=16").mkdir(parents=True)  # an earlier sweep's job
    launcher = LocalLauncher(submitit_folder=str(tmp_path / ".submitit" / "%j"), tasks_per_node=1, timeout_min=1)
    launcher.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    launcher.launch([["model.units=8"], ["model.units=16"]], initial_job_idx=0)
    assert sorted(p.name for p in sweep.iterdir()) == ["0_model.units=8", "1_model.units=16", "1_model.units=16-1"]

    # what each job is sent, and sent again when it is requeued: its folder as Hydra's own settings
    parser = OverridesParser.create()
    expected = [(8, "0_model.units=8"), (16, "1_model.units=16-1")]
    for (overrides, *_), (units, name) in zip(submitted, expected, strict=True):
        parsed = {o.get_key_element(): o.value() for o in parser.parse_overrides(overrides)}
        assert parsed == {"model.units": units, "hydra.sweep.dir": str(sweep), "hydra.sweep.subdir": name}


# -- submitit_local, for real ----------------------------------------------------------------------------------


class PreemptJob(SendSignal):
    """Sends SIGUSR2 after step ``step`` in the job training ``units`` units only (as the local runner would near
    its time limit), so one job of a sweep is preempted and the other runs through."""

    def __init__(self, step: int, units: int) -> None:
        super().__init__(step, int(signal.SIGUSR2))
        self.units = units

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.hparams.units == self.units:
            super().on_train_batch_end(trainer, pl_module, *args)


@pytest.mark.slow
def test_a_local_sweep_leaves_a_run_folder_per_job_and_a_preempted_job_requeues_and_resumes(tmp_path, data_dir):
    # The 8-unit job is sent SIGUSR2 after step 3: it saves, submitit starts it again and it resumes from step 3 in
    # the same folder; the 16-unit job runs through.
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", *TINY, "model.units=8,16",
        "trainer.max_steps=6", "trainer.enable_progress_bar=false", "sample.length=0", "callbacks.text_sample=null",
        f"hydra.sweep.dir={sweep}", f"paths.outputs_root={tmp_path}", f"paths.data_dir={data_dir}",
        "+callbacks.preempt._target_=tests.test_cluster.PreemptJob", "+callbacks.preempt.step=3",
        "+callbacks.preempt.units=8",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = forkserver.run(cmd, ROOT, env, 240)
    ok(done)
    folders = run_folders(sweep)
    assert len(folders) == 2
    # one folder per job, however often it started: nothing else under the sweep or the outputs root
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".submitit", "0_model.units=8", "1_model.units=16"]
    assert list(tmp_path.iterdir()) == [sweep]
    assert sorted(torch.load(f / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["units"]
                  for f in folders) == [8, 16]  # fmt: skip
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.err"))
    outs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.out"))
    for folder in folders:
        last = folder / "checkpoints" / "last.ckpt"
        ckpt = checkpoint.load(last)
        assert ckpt["global_step"] == 6
        preempted = ckpt["hyper_parameters"]["units"] == 8
        line = f"interrupted: SIGUSR2 at epoch 0, step 3: saved {last}; the job is requeued and resumes from it"
        assert (line in logs.splitlines()) == preempted, logs
        assert (f"resuming {last} at step 3 in {folder}" in outs) == preempted
        assert (folder / "config-resume-1.yaml").is_file() == preempted
        if preempted:
            assert OmegaConf.load(folder / "config-resume-1.yaml").ckpt_path == str(last)
    assert done.stdout.count("done; its console output:") == 2
