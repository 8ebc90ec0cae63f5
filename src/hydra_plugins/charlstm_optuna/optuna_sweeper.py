"""A Hydra sweeper that runs an Optuna (>= 4) study: ``python train.py -m hparams_search=lstm``.

Each trial is a Hydra job launched by the configured launcher (in this process by default, submitit on a
cluster); the study lives in SQLite in the sweep folder, so the same command continues it. Hydra imports this
module at every start: Optuna and the project are imported only when a search runs. (No postponed annotations
here: Hydra runs this module before registering it, and dataclasses then cannot resolve string annotations.)
"""

import logging
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class PrunerConf:
    name: str = "median"  # median | none
    startup_trials: int = 3  # complete trials before any is pruned
    warmup_steps: int = 0  # a trial is never pruned before this training step


@dataclass
class CharLSTMOptunaConf:
    _target_: str = "hydra_plugins.charlstm_optuna.optuna_sweeper.CharLSTMOptunaSweeper"
    study_name: str = "charlstm"
    storage: str | None = None  # null: sqlite in <sweep dir>/study.db
    direction: str = "minimize"
    n_trials: int = 20  # the study's total: a continued study runs only the missing ones
    n_jobs: int = 1  # trials launched together (for parallel launchers)
    seed: int | None = None
    startup_trials: int = 5  # random trials before TPE models the results
    # seconds between the heartbeats of a running trial; a trial silent for two of them belongs to a search process
    # that is gone and runs again (so several processes can run one study, each a worker)
    heartbeat_interval: int = 60
    pruner: PrunerConf = field(default_factory=PrunerConf)
    # key -> Hydra sweep expression: choice(...), range(...), interval(...), tag(log, interval(...))
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="charlstm_optuna", node=CharLSTMOptunaConf, provider="charlstm"
)


class CharLSTMOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        from charlstm.core.errors import exit_on_error

        return exit_on_error(self._search)(list(arguments))

    def _search(self, arguments: list[str]) -> list[JobReturn]:
        from charlstm.app import search

        assert self.config is not None
        s = OmegaConf.to_container(OmegaConf.create(self.settings), resolve=True)
        space, fixed = search.search_space(s["params"] or {}, arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        probe = fixed + [search.override(k, first_value(d)) for k, d in space.items()]
        self.validate_batch_is_legal([probe])  # a mistyped key fails here, before any trial exists
        url = search.storage_url(s["storage"], sweep_dir)
        study, storage = search.open_study(url, s["study_name"], s["direction"], fixed, s["seed"], s["startup_trials"],
                                  s["pruner"], s["heartbeat_interval"])  # fmt: skip
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        name_jobs_by_params()
        metric = str(self.config.get("optimized_metric") or "value")
        n_trials = int(s["n_trials"])
        log.info("study %s (%s): %d of %d trials done", study.study_name, url, search.counted(study), n_trials)
        returns: list[JobReturn] = []
        try:
            while (done := search.counted(study)) < n_trials:
                search.requeue_stale(study, storage)  # another worker's trials whose process is gone run again
                trials = [study.ask(space) for _ in range(max(1, min(int(s["n_jobs"]), n_trials - done)))]
                with search.heartbeats(storage, study, trials):
                    returns += self._run(study, trials, fixed, url, metric)
        except BaseException as err:
            import optuna

            if isinstance(err, optuna.exceptions.StorageInternalError):  # a write refused: no report can be read
                raise search.storage_failure(url, err) from None
            self._report(study, fixed, sweep_dir, metric, final=False)  # the trials so far
            if isinstance(err, KeyboardInterrupt):  # between two trials
                from charlstm.core.errors import TrainingInterrupted

                raise TrainingInterrupted("search stopped; the same command continues the study") from None
            raise
        self._report(study, fixed, sweep_dir, metric)
        return returns

    def _run(self, study: Any, trials: list[Any], fixed: list[str], url: str, metric: str) -> list[JobReturn]:
        """Launch the trials as jobs and tell the study how each ended."""
        from charlstm.app import search
        from charlstm.core.errors import TrainingInterrupted

        batch = [
            fixed + [search.override(k, v) for k, v in t.params.items()]
            + [search.override("optuna.storage", url), search.override("optuna.study", study.study_name),
               f"optuna.trial={t.number}"]
            for t in trials
        ]  # fmt: skip
        numbers = [t.number for t in trials]
        try:
            if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
                returns = list(self.launcher.launch(batch, initial_job_idx=numbers[0]))
            else:
                returns = [self.launcher.launch([b], initial_job_idx=n)[0] for b, n in zip(batch, numbers, strict=True)]
        except (KeyboardInterrupt, SystemExit, Exception) as err:
            code = err.code if isinstance(err, SystemExit) else None
            interrupted = isinstance(err, KeyboardInterrupt) or code in (130, 143)
            for t in trials:
                if not is_running(study, t.number):
                    continue
                if interrupted:
                    search.mark_interrupted(study, t)
                else:
                    why = f"exit status {code}" if isinstance(err, SystemExit) else f"{type(err).__name__}: {err}"
                    self._tell(study, t, None, " ".join(why.split())[:300], metric)
            if interrupted:
                raise TrainingInterrupted(
                    f"search stopped during trial {', '.join(map(str, numbers))}; the same command continues the "
                    "study and runs it again", signal.SIGTERM if code == 143 else signal.SIGINT,
                ) from None  # fmt: skip
            return []
        for t, ret in zip(trials, returns, strict=True):
            value, error = None, None
            if ret.status == JobStatus.COMPLETED:
                value = ret.return_value
            else:
                error = job_error(ret)
            if value is None and error is None:  # a failed job records its one-line error in result.json
                from charlstm.app.summary import read_result

                folder = ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg is not None else None
                error = ((read_result(folder) or {}).get("error") if folder else None) or f"no {metric}"
            self._tell(study, t, value, error, metric)
        return returns

    @staticmethod
    def _tell(study: Any, trial: Any, value: Any, error: str | None, metric: str) -> None:
        from optuna.trial import TrialState

        from charlstm.app import search
        from charlstm.app.pruning import PRUNED_AT

        if not is_running(study, trial.number):  # failed as stale by another worker: this process sent no heartbeat
            log.warning("trial %d: another search process found no heartbeat of it and ran it again; this result "
                        "is not counted", trial.number)  # fmt: skip
            return
        pruned_at = search.stored(study, trial.number).user_attrs.get(PRUNED_AT)  # written by the job
        if error is None and pruned_at is not None:
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d: pruned at step %d", trial.number, pruned_at)
            return
        if error is None and not (isinstance(value, int | float) and math.isfinite(value)):
            error = f"the job returned {value!r}, not a number for {metric}"
        if error is not None:
            trial.set_user_attr(search.ERROR, error)
            study.tell(trial, state=TrialState.FAIL)
            log.info("trial %d: failed (%s)", trial.number, error)
            return
        study.tell(trial, float(value))
        best = study.best_trial
        log.info("trial %d: %s %.4f (best: trial %d, %.4f)", trial.number, metric, value, best.number, best.value)

    def _report(self, study: Any, fixed: list[str], sweep_dir: Path, metric: str, final: bool = True) -> None:
        """The sweep summary (best trial first), the best trial as a command, Optuna's plots."""
        from charlstm.app import search
        from charlstm.app.summary import console_lines, rank_rows, write_summary
        from charlstm.core.errors import TrainingFailed

        rows = search.summary_rows(study, sweep_dir)
        if not rows:
            return
        direction = study.direction.name.lower()
        md = write_summary(sweep_dir, rows, metric, direction, failures=())  # failed trials are results too
        ranked = rank_rows(rows, metric, direction)
        states = [r["state"] for r in rows]
        counts = ", ".join(f"{states.count(s)} {s}" for s in ("complete", "pruned", "failed") if s in states)
        lines = console_lines(f"study {study.study_name}: {len(rows)} trials ({counts}), best {metric} first:",
                              ranked, metric, md)  # fmt: skip
        lines += [f"plot:         {line}" for line in search.write_plots(study, sweep_dir)]
        command = search.best_command(study, fixed)
        if command is None:
            print("\n".join(lines), flush=True)
            if not final:
                return
            raise TrainingFailed(f"no trial of study {study.study_name} completed ({counts}); see {md}")
        best = study.best_trial
        lines += [f"best:         trial {best.number}, {metric} {best.value:.4f}; as a run of its own:",
                  f"  {command}"]  # fmt: skip
        print("\n".join(lines), flush=True)


def name_jobs_by_params() -> None:
    """Job folders and result.json name a trial by its searched values (charlstm.app.rundir), without the keys through
    which the job finds its trial."""
    import json
    import os

    from charlstm.app.rundir import FIXED_ENV
    from charlstm.app.search import JOB_KEYS

    keys = json.loads(os.environ.get(FIXED_ENV, "null")) or ["paths"]
    os.environ[FIXED_ENV] = json.dumps([*keys, *JOB_KEYS])


def first_value(dist: Any) -> Any:
    """A value inside a distribution (to check that the trials' overrides compose)."""
    return dist.choices[0] if hasattr(dist, "choices") else dist.low


def is_running(study: Any, number: int) -> bool:
    from optuna.trial import TrialState

    from charlstm.app import search

    return search.stored(study, number).state == TrialState.RUNNING


def job_error(ret: JobReturn) -> str:
    """A failed job's exception in one line. Hydra's public ``JobReturn.return_value`` raises it, after writing its
    own "Error executing job" line to stderr, which is left out here: the error goes into the study and summary."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _ = ret.return_value
    except Exception as err:
        return " ".join(f"{type(err).__name__}: {err}".split())[:300]
    return f"job ended as {ret.status.name.lower()}"
