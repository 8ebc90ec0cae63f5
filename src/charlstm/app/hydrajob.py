"""What Hydra says about the running job: its command line's overrides, its folder, its place in a multirun."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from charlstm.app.jobranks import multirun_job
from charlstm.app.rundir import override_key, swept_overrides


def hydra_overrides() -> list[str] | None:
    """The command line's overrides when running under Hydra (None when called directly, e.g. from tests)."""
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def command_line_keys() -> list[str]:
    """The config keys this Hydra job's command line sets, a sweep job's swept keys only; empty outside Hydra."""
    return [override_key(o) for o in swept_overrides(hydra_overrides() or [])]


def hydra_run_dir() -> Path | None:
    """The folder Hydra runs this job in (None when called directly, or before Hydra has one)."""
    if not HydraConfig.initialized():
        return None
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def sweep_job() -> tuple[int, list[str], Path] | None:
    """(job number, its overrides, the sweep folder) when this run is a job of a multirun, else None."""
    hydra_cfg = multirun_job()
    if hydra_cfg is None:
        return None
    return int(hydra_cfg.job.num), list(hydra_cfg.overrides.task), Path(str(hydra_cfg.sweep.dir))
