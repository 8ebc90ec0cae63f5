"""DDP inside a job of a local multirun (``python train.py -m ... trainer=ddp_cpu``): the ranks Lightning starts run
that job alone, in its folder, and the process is left ready for the next job.

Lightning starts each extra rank by running the command line again with ``hydra.run.dir`` set to the run folder
(``_hydra_subprocess_cmd``). For a multirun job that command line is the whole sweep, and the run folder setting
is not the job's folder, so the rank would run every job of the sweep (and claim a run folder of its own). While
the job trains, the command line is the job's own overrides and ``hydra.run.dir`` its folder; after it, the ranks
are waited for and the process group and Lightning's rank variables are taken away, so the next job starts its
own ranks on a fresh port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict, read_write

# What Lightning's launcher sets in this process for the ranks it starts (they would make the next job's trainer
# think its ranks were started for it)
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# How long the ranks may take to exit after the job's last collective call, before they are stopped
RANK_EXIT_S = 120


def starts_ranks(trainer: Any) -> bool:
    """True when ``trainer`` starts its other ranks by re-running the command line (Lightning's DDP default).

    Told by what the strategy's launcher shows publicly: none (one process); interactive-compatible (forked ranks,
    which run the function, not the script); without a ``cluster_environment`` of its own (spawned ranks); or one
    whose processes a scheduler creates (SLURM, torchrun)."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is None or launcher.is_interactive_compatible:
        return False
    environment = getattr(launcher, "cluster_environment", None)
    return environment is not None and not environment.creates_processes_externally


def multirun_job() -> Any | None:
    """Hydra's config of this job when it is a job of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


@contextmanager
def sweep_job_ranks(trainer: Any) -> Iterator[None]:
    """Around a multirun job's fit (and validation): the ranks the trainer starts run this job in its folder, and
    are gone when it ends. Elsewhere (a single run, ranks started by a scheduler, one process) it does nothing."""
    hydra_cfg = multirun_job()
    if hydra_cfg is None or not starts_ranks(trainer):
        yield
        return
    argv, env = sys.argv, {name: os.environ.get(name) for name in DIST_ENV}
    run_dir = OmegaConf.to_container(hydra_cfg.run, resolve=False)["dir"]  # as configured, unresolved
    sys.argv = [argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = str(hydra_cfg.runtime.output_dir)
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = run_dir
        _end_ranks(trainer.strategy.launcher, env)


def _end_ranks(launcher: Any, env: dict[str, str | None]) -> None:
    for proc in launcher.procs:
        try:
            proc.wait(timeout=RANK_EXIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # The same list Lightning's child-process watcher holds: emptied, it stops watching (it would otherwise stop
    # this whole process when a rank of a job that failed, and so the sweep went on, exits non-zero).
    launcher.procs.clear()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
