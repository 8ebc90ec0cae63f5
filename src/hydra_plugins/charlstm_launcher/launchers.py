"""Hydra's submitit launchers (configs/hydra/launcher/), with what this project adds: a requeued job knows it is
one (so it resumes from its run folder's last.ckpt), a job that ends without a result is one line naming it and
its log, and the SLURM launcher on a machine without SLURM is one line too."""

from __future__ import annotations

import copy
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from charlstm.app import rundir
from charlstm.app.cli import quiet_schema_note
from charlstm.app.cluster import REQUEUE_ENV
from charlstm.core.errors import ConfigError, JobFailed

# Lines a job's stderr ends with when charlstm stopped it (see charlstm.core.errors.exit_on_error).
_OUTCOME_PREFIXES = ("error", "interrupted")


def last_outcome_line(log: Path) -> str | None:
    """The last one-line error or interruption a job printed, else its last line (a traceback's last line)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 65536))
            lines = [line.strip() for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return None
    ours = [line for line in lines if line.startswith(_OUTCOME_PREFIXES)]
    return (ours or lines or [None])[-1]


def quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value (a folder name holds ``=`` and ``,``): in quotes, Hydra reads a
    backslash as an escape only in a run of them before a quote or the end."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), value) + "'"


class _Requeueable:
    """Mixed into the plugin's launchers: the object submitit pickles, calls in the job and asks to checkpoint."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any
    requeues = 0

    def setup(self, **kwargs: Any) -> None:
        # Before the sweeper makes the sweep folder: a refused command leaves nothing behind.
        if self._EXECUTOR == "slurm" and shutil.which("srun") is None:
            raise ConfigError(
                "hydra/launcher=submitit_slurm submits to SLURM, which this machine lacks (no srun on PATH): run the "
                "command on the cluster's login node, or try the same jobs here with hydra/launcher=submitit_local"
            )
        super().setup(**kwargs)  # type: ignore[misc]

    def __call__(
        self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str, state: Any
    ) -> JobReturn:
        """One task of the job (one per device): its Hydra job in the folder claimed for it when it was submitted
        (named in its overrides), told whether it was requeued and which rank it is."""
        import submitit

        quiet_schema_note()  # the job composes its config again
        if self.requeues:
            os.environ[REQUEUE_ENV] = str(self.requeues)
        task = submitit.JobEnvironment()
        if task.num_tasks > 1:
            if self._EXECUTOR == "local":
                # srun's part on one machine: Lightning reads these and joins the processes submitit started
                port = 20000 + int(task.job_id) % 20000  # the same in every task of the job
                os.environ.update(LOCAL_RANK=str(task.local_rank), NODE_RANK="0", WORLD_SIZE=str(task.num_tasks),
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
            if task.global_rank > 0:
                # rank 0 writes the run folder's .hydra/ and train.log; the others log beside it
                name = f"{self.config.hydra.job.name}_rank{task.global_rank}"
                sweep_overrides = [*sweep_overrides, "hydra.output_subdir=null", f"hydra.job.name={name}"]
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, state)  # type: ignore[misc]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """What submitit runs when it requeues this job: the same job, marked as requeued once more."""
        import submitit

        again = copy.copy(self)
        again.requeues = self.requeues + 1
        return submitit.helpers.DelayedSubmission(again, *args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit one job per override list and wait for all; any job that ended without a result (a one-line
        error, an interruption that was not requeued, a kill) is reported in one line after the others end."""
        import submitit

        assert self.config is not None
        params = dict(self.params)
        folder = params.pop("submitit_folder")
        init = {}
        if "max_num_timeout" in params:  # an argument of the executor, not a job parameter
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=folder, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        submitit_launcher.log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        numbered = [(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
        for num, overrides in numbered:
            submitit_launcher.log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        # Each job's folder is claimed here, once, and travels with the job as Hydra overrides: every task of it and
        # every start of it after a requeue runs in that folder (a job claiming its own would take a new `-N` folder
        # each start).
        named = str(self.config.hydra.sweep.dir)  # as the job reads it, unnormalized
        args = []
        for num, overrides in numbered:
            folder = rundir.claim_job_dir(named, num, overrides)
            fixed = [f"hydra.sweep.dir={quoted(named)}", f"hydra.sweep.subdir={quoted(Path(folder).name)}"]
            args.append(([*overrides, *fixed], "hydra.sweep.dir", num, f"job_id_for_{num}", state))
        jobs = executor.map_array(self, *zip(*args, strict=True))

        results, failed = [], []
        for job, (num, overrides) in zip(jobs, numbered, strict=True):
            try:
                results.append(job.results()[0])
                submitit_launcher.log.info(f"\t#{num} done; its console output: {job.paths.stdout}")
            except submitit.core.utils.UncompletedJobError:
                line = last_outcome_line(job.paths.stderr) or "no output"
                line = line.removeprefix("error: ")
                what = " ".join(filter_overrides(overrides)) or "no overrides"
                failed.append(f"job #{num} ({what}) failed: {line} (log: {job.paths.stderr})")
        if failed:
            more = f"; {len(failed) - 1} more failed, their logs are beside it" if len(failed) > 1 else ""
            raise JobFailed(f"{failed[0]}{more}")
        return results


class SlurmLauncher(_Requeueable, submitit_launcher.SlurmLauncher):
    """``hydra/launcher=submitit_slurm``: one SLURM job per Hydra job."""


class LocalLauncher(_Requeueable, submitit_launcher.LocalLauncher):
    """``hydra/launcher=submitit_local``: one local process tree per Hydra job, as submitit runs it."""
