"""``python tests/dry_submit.py ARGS`` runs ``python train.py ARGS`` as a SLURM login node would, up to the sbatch
call: Hydra's sweeper, the project's launcher and submitit's executor all run for real; the jobs are not sent.
What would have been sent is written as JSON to $DRY_SUBMIT_OUT (when set): the sbatch script, the executor's settings
and each job's composed config (checked by charlstm.app.config.validate_train, as the job itself would)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class NotSent:
    """Stands for a submitted job: its result is an empty, completed Hydra job."""

    paths = SimpleNamespace(stdout="(not sent)")

    def results(self) -> list[Any]:
        from hydra.core.utils import JobReturn, JobStatus

        return [JobReturn(status=JobStatus.COMPLETED, _return_value=None)]


def map_array(executor: Any, launcher: Any, *iterables: Any) -> list[NotSent]:
    from omegaconf import OmegaConf

    from charlstm.app.config import validate_train

    inner = executor._executor
    jobs = []
    for overrides, _key, num, _id, _state in zip(*iterables, strict=True):
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        # claimed here, sent with the job as its hydra.sweep.dir and hydra.sweep.subdir (also to its requeued start)
        folder = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        task = list(cfg.hydra.overrides.task)
        with_hydra = OmegaConf.to_container(cfg, resolve=False)
        with_hydra.pop("hydra")
        OmegaConf.set_struct(cfg, False)
        cfg.pop("hydra")
        validate_train(cfg)
        jobs.append({"num": num, "overrides": task, "config": with_hydra, "folder": str(folder)})
    parameters = dict(inner.parameters)
    if len(jobs) > 1:
        inner.parameters["map_count"] = len(jobs)  # an array job, as submitit sends a sweep
    script = inner._make_submission_file_text(inner._submitit_command_str, "dry")
    record = {"executor": type(inner).__name__, "parameters": parameters, "script": script, "jobs": jobs,
              "max_num_timeout": inner.max_num_timeout, "launcher": type(launcher).__qualname__}  # fmt: skip
    if os.environ.get("DRY_SUBMIT_OUT"):
        Path(os.environ["DRY_SUBMIT_OUT"]).write_text(json.dumps(record, indent=1, default=str))
    return [NotSent() for _ in jobs]


def main() -> None:
    import submitit

    from charlstm.app.cli import hydra_entry

    # submitit's SLURM executor wants srun on PATH; it is never run here
    bin_dir = Path(tempfile.mkdtemp(prefix="dry-slurm-"))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    submitit.AutoExecutor.map_array = map_array  # type: ignore[method-assign]
    sys.argv[0] = str(ROOT / "train.py")
    hydra_entry(ROOT / "configs", "train", "charlstm.app.train:run")


if __name__ == "__main__":
    main()
