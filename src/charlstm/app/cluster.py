"""Runs that a job scheduler started: a requeued job finds its run folder's last.ckpt and goes on from it, the
scheduler's requeue signal is answered at a step boundary, and Lightning's SLURM environment is told to leave
requeueing to the launcher (one mechanism, not two)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from charlstm.app.cli import command_line
from charlstm.core.errors import ConfigError

# The number of times submitit requeued this job, set when it starts it again (see hydra_plugins.charlstm_launcher).
# An environment variable because the DDP ranks Lightning starts in the job run the command line again (a process
# of their own) and must resume as rank 0 does; SLURM's own count (SLURM_RESTART_COUNT) misses submitit's requeues.
REQUEUE_ENV = "CHARLSTM_REQUEUES"


def under_submitit() -> bool:
    """True inside a job that a submitit executor (Hydra's submitit launchers) started, on SLURM or locally."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def requeue_count() -> int:
    """How many times this job was requeued: by the launcher after the requeue signal, or by SLURM itself
    (``SLURM_RESTART_COUNT``: a preempted job on a partition that requeues, a node failure)."""
    counts = [os.environ.get(REQUEUE_ENV, ""), os.environ.get("SLURM_RESTART_COUNT", "")]
    return max((int(c) for c in counts if c.isdigit()), default=0)


def requeued_checkpoint(run_dir: Path) -> Path | None:
    """``RUN/checkpoints/last.ckpt`` when this job is a requeued one and its run folder has one, else None."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if requeue_count() > 0 and last.is_file() and (run_dir / "config.yaml").is_file():
        return last
    return None


def requeue_signal() -> int | None:
    """The signal submitit requeues a job on (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL names another), inside a
    submitit job whose handler for it is installed; None elsewhere (the signal then keeps its default action)."""
    if not under_submitit():
        return None
    signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if signum is None or not callable(signal.getsignal(signum)):
        return None
    return int(signum)


def hand_over(handler: Callable[[int, Any], Any] | None, signum: int, ckpt: Path) -> tuple[str, int | None]:
    """Let the job runner's own handler for ``signum`` requeue the job, once ``ckpt`` is saved.

    Returns what to tell the user and the exit status the runner chose: submitit requeues the job (``scontrol
    requeue`` on SLURM, a restart of the task here) and exits, which is caught; it refuses in an exception when
    the job has reached the time limit too many times; on every rank but the first it does nothing.
    """
    if not callable(handler):
        return f"resume with: {command_line('train.py', f'ckpt_path={ckpt}')}", None
    try:
        handler(signum, None)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
        return "the job is requeued and resumes from it", code
    except Exception as refused:  # submitit's UncompletedJobError: "Job not requeued because: ..."
        why = " ".join(str(refused).split()).rstrip(".")
        return f"not requeued ({why}); resume with: {command_line('train.py', f'ckpt_path={ckpt}')}", None
    return "the job's first process requeues it", None


def lightning_plugins(trainer_cfg: DictConfig) -> list[Any]:
    """Lightning plugins for a run inside a submitit SLURM job: its SLURM environment without auto-requeue.

    Lightning would otherwise answer SIGUSR1 by saving an ``hpc_ckpt`` mid-step and requeueing on its own; the
    launcher's requeue (SIGUSR2, at a step boundary, into ``last.ckpt``) is the one this project resumes from.
    """
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if not (under_submitit() and SLURMEnvironment.detect()):
        return []
    check_allocation(trainer_cfg)
    return [SLURMEnvironment(auto_requeue=False)]


def check_allocation(trainer_cfg: DictConfig) -> None:
    """The SLURM job must start one task per device on each of ``trainer.num_nodes`` nodes."""
    devices, nodes = trainer_cfg.get("devices"), int(trainer_cfg.get("num_nodes") or 1)
    per_node, allocated = os.environ.get("SLURM_NTASKS_PER_NODE", ""), os.environ.get("SLURM_NNODES", "")
    if per_node.isdigit() and (not isinstance(devices, int) or devices != int(per_node)):
        raise ConfigError(
            f"trainer.devices={devices} but this SLURM job runs {per_node} task(s) per node; Lightning needs one "
            "task per device: leave hydra.launcher.tasks_per_node at its default (${trainer.devices}) and set "
            "trainer.devices to a number"
        )
    if allocated.isdigit() and int(allocated) != nodes:
        raise ConfigError(
            f"trainer.num_nodes={nodes} but this SLURM job has {allocated} node(s); leave hydra.launcher.nodes at "
            "its default (${trainer.num_nodes}) and set trainer.num_nodes"
        )
