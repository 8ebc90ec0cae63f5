"""Optuna search through Hydra's multirun: the search space in Hydra's sweep syntax, the study in SQLite beside
the jobs (the same command continues it), and the callback with which a trial reports val/loss to the pruner.

The sweeper (hydra_plugins.charlstm_optuna) asks the study for trials and launches them as jobs; each job gets
``optuna.storage``, ``optuna.study`` and ``optuna.trial`` and talks to the study itself, so a job may run in
another process or on another machine (submitit) as long as it reaches the storage.
"""

from __future__ import annotations

import logging
import math
import shlex
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from charlstm.errors import ConfigError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"
# trial user attributes written by the job (pruned) and by the sweeper (the rest)
PRUNED_AT = "pruned_at_step"
INTERRUPTED = "interrupted"  # the trial was running when its search stopped: not counted, queued again
RETRY_OF = "retry_of"
RUN_FOLDER = "run_folder"
ERROR = "error"
# the keys through which a job finds its trial; never part of a run's settings (nor of its folder's name)
JOB_KEYS = ("optuna.storage", "optuna.study", "optuna.trial")
SPACE_HELP = "choice(a,b,...), range(start,stop[,step]), interval(low,high) or tag(log,interval(low,high))"


def quiet_optuna() -> None:
    """Optuna's own INFO lines (study created, trial finished) repeat what the search prints itself."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # its matplotlib plots


# -- the search space ---------------------------------------------------------------------------------------------
def distribution(key: str, text: str, value: Any = None) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution a Hydra sweep expression describes (``range`` excludes its stop, as in Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if value is None:
        try:
            value = OverridesParser.create().parse_override(f"{key}={text}").value()
        except HydraException:
            value = None
    if isinstance(value, ChoiceSweep) and value.list:
        choices = list(value.list)
        if all(isinstance(c, str | int | float | bool) or c is None for c in choices):
            return CategoricalDistribution(choices)
    elif isinstance(value, RangeSweep):
        values = list(value.range())
        if values and all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        if values:
            return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    elif isinstance(value, IntervalSweep) and value.start is not None and value.end is not None:
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ConfigError(f"{key}={text} is not a search range the Optuna sweeper reads; write {SPACE_HELP}")


def search_space(params: dict[str, str], arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The search space (the config's ``hydra.sweeper.params``, then sweep expressions on the command line) and the
    command line's plain overrides, which every trial gets; a plain override of a searched key fixes it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space = {key: distribution(key, str(text)) for key, text in (params or {}).items()}
    fixed: dict[str, str] = {}  # key -> its override (a key given twice: the last one wins, as in Hydra)
    for arg, parsed in zip(arguments, OverridesParser.create().parse_overrides(arguments), strict=True):
        key = parsed.get_key_element()
        if key in JOB_KEYS:
            raise ConfigError(f"{key} is set by the Optuna sweeper for each trial; remove {arg} from the command")
        fixed.pop(key, None)
        if parsed.is_sweep_override():
            space[key] = distribution(key, arg.split("=", 1)[1], parsed.value())
        else:
            space.pop(key, None)
            fixed[key] = arg
    if not space:
        raise ConfigError(
            "the search space is empty: set hydra.sweeper.params or sweep a key, e.g. 'model.units=choice(128,256)'"
        )
    return space, list(fixed.values())


def override(key: str, value: Any) -> str:
    """``key=value`` as Hydra reads it (strings quoted; floats to 4 significant digits, as a person would write
    them: the job, its folder and the printed command all show the same value)."""
    from charlstm.cli import quote_value

    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, str):
        return f"{key}={quote_value(value)}"
    if isinstance(value, float):
        return f"{key}={float(f'{value:.4g}')!r}"
    return f"{key}={value!r}"


# -- the study ----------------------------------------------------------------------------------------------------
def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The study's storage: a URL as given, or SQLite in ``sweep_dir/study.db`` (made absolute for the jobs)."""
    if storage:
        return storage
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"


def make_pruner(settings: dict[str, Any]) -> optuna.pruners.BasePruner:
    import optuna

    name = settings.get("name", "median")
    if name in (None, "none"):
        return optuna.pruners.NopPruner()
    if name != "median":
        raise ConfigError(f"hydra.sweeper.pruner={name} is not known; use median or none")
    return optuna.pruners.MedianPruner(
        n_startup_trials=int(settings.get("startup_trials", 3)), n_warmup_steps=int(settings.get("warmup_steps", 0))
    )


def trial_id(study: optuna.Study, number: int) -> int:
    storage = study._storage  # the storage object the study was opened with: its public per-trial calls
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def stored(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """A trial as the storage has it now (a ``Trial`` object from ``ask`` keeps what it saw then: it misses what
    the job wrote since, e.g. that the pruner stopped it)."""
    return study._storage.get_trial(trial_id(study, number))


def set_attr(study: optuna.Study, number: int, key: str, value: Any) -> None:
    study._storage.set_trial_user_attr(trial_id(study, number), key, value)


def open_study(
    url: str, name: str, direction: str, fixed: list[str], seed: int | None, startup_trials: int,
    pruner: dict[str, Any],
) -> optuna.Study:  # fmt: skip
    """Create the study or continue it. A continued study must keep its direction and the command line's settings
    (else its trials would not compare); trials left running by a search that died are failed and queued again."""
    import optuna

    quiet_optuna()
    storage = optuna.storages.RDBStorage(url)
    try:
        done = storage.get_n_trials(storage.get_study_id_from_name(name))
    except KeyError:
        done = 0
    # a continued search draws new points: the sampler's seed moves on with the number of trials so far
    sampler = optuna.samplers.TPESampler(seed=None if seed is None else seed + done, n_startup_trials=startup_trials)
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"hydra.sweeper.direction={direction} is not known; use minimize or maximize")
    study = optuna.create_study(
        storage=storage, study_name=name, direction=direction, sampler=sampler, pruner=make_pruner(pruner),
        load_if_exists=True,
    )  # fmt: skip
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {name} in {url} was made to {study.direction.name.lower()}; keep hydra.sweeper.direction or "
            "start another study with hydra.sweeper.study_name=NEW"
        )
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", fixed)
    elif sorted(recorded) != sorted(fixed):
        was = " ".join(recorded) or "no overrides"
        raise ConfigError(
            f"study {name} in {url} was run with {was}; continue it with the same settings, or start another study "
            "with hydra.sweeper.study_name=NEW"
        )
    study.set_user_attr("pruner", dict(pruner))  # read by the jobs
    requeue_interrupted(study)
    return study


def requeue_interrupted(study: optuna.Study) -> None:
    """A trial still RUNNING in the storage belongs to a search that stopped (Ctrl-C, a killed process): it is
    marked failed and ``interrupted`` (not counted) and its settings are queued to run again as a new trial."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        mark_interrupted(study, trial.number, trial.params)
        log.info("trial %d was running when an earlier search stopped: it runs again as a new trial", trial.number)


def mark_interrupted(study: optuna.Study, number: int, params: dict[str, Any]) -> None:
    from optuna.trial import TrialState

    set_attr(study, number, INTERRUPTED, True)
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(params, user_attrs={RETRY_OF: number})


def counted(study: optuna.Study) -> int:
    """Trials that ran to an end: complete, pruned or failed (an interrupted trial runs again, so is not counted)."""
    from optuna.trial import TrialState

    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=ended) if not t.user_attrs.get(INTERRUPTED))


def state_of(trial: optuna.trial.FrozenTrial) -> str:
    if trial.user_attrs.get(INTERRUPTED):
        return "interrupted"
    names = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    return names.get(trial.state.name, trial.state.name.lower())


def summary_rows(study: optuna.Study, sweep_dir: Path) -> list[dict[str, Any]]:
    """The sweep summary's rows (charlstm.summary): one per trial that ran, from its job's ``result.json``, in the
    state the study gave it. An interrupted trial is left out: it ran again under a new number."""
    from charlstm.summary import collect_rows

    by_job = {row["job"]: row for row in collect_rows(sweep_dir) if row.get("job") is not None}
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = state_of(t)
        if state not in ("complete", "pruned", "failed"):
            continue
        row = by_job.get(t.number) or {
            "job": t.number, "overrides": " ".join(override(k, v) for k, v in t.params.items()),
            "params": dict(t.params), "history": [],
        }  # fmt: skip
        row["state"] = state
        if state == "failed":
            row["error"] = row.get("error") or t.user_attrs.get(ERROR)
        if state == "pruned":
            row["pruned_at_step"] = t.user_attrs.get(PRUNED_AT)
        rows.append(row)
    return rows


def pruned_at(callbacks: list[Any]) -> int | None:
    """The step at which the run's pruning callback stopped it (None: not pruned, or not a trial)."""
    return next((cb.pruned_at for cb in callbacks if isinstance(cb, OptunaPruning) and cb.pruned_at is not None), None)


def best_command(study: optuna.Study, fixed: list[str], script: str = "train.py") -> str | None:
    """``python train.py ...`` with the command line's own settings and the best trial's values."""
    try:
        best = study.best_trial
    except ValueError:  # no complete trial
        return None
    args = [a for a in fixed if a.split("=", 1)[0].lstrip("+~") != "hparams_search"]
    args += [override(k, v) for k, v in best.params.items()]
    return " ".join(["python", script, *(shlex.quote(a) for a in args)])


def write_plots(study: optuna.Study, folder: Path) -> list[str]:
    """Optuna's optimization history and parameter importances as PNGs in ``folder``; one line per plot (its path,
    or why it was left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vm

    quiet_optuna()
    lines = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for name, plot, needs in (
        ("optuna_history.png", vm.plot_optimization_history, 1),
        ("optuna_importance.png", vm.plot_param_importances, 2),
    ):
        path = folder / name
        if len(complete) < needs:
            lines.append(f"{name}: left out, it needs {needs} complete trial(s) and the study has {len(complete)}")
            continue
        try:
            ax = plot(study)
            ax.figure.tight_layout()
            ax.figure.savefig(path, dpi=120)
            plt.close(ax.figure)
            lines.append(str(path))
        except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. no variation to tell importances from
            lines.append(f"{name}: left out ({' '.join(str(err).split())[:160]})")
    return lines


# -- the job's side -----------------------------------------------------------------------------------------------
class OptunaPruning(Callback):
    """Reports ``monitor`` to the study's trial after every validation and stops training, cleanly, when the
    pruner finds the trial hopeless (the run ends as usual: checkpoints, report, its metric returned).

    Inert without a trial (``python train.py hparams_search=lstm`` without ``-m``). Rank 0 talks to the study
    and every rank follows its decision.
    """

    def __init__(
        self, storage: str | None = None, study: str | None = None, trial: int | None = None, monitor: str = "val/loss"
    ) -> None:
        self.storage, self.study_name, self.number, self.monitor = storage, study, trial, monitor
        self.pruned_at: int | None = None
        self._trial: optuna.Trial | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.number is None or not trainer.is_global_zero:
            return
        import optuna

        if not (self.storage and self.study_name):
            raise ConfigError("optuna.trial is set without optuna.storage and optuna.study; run the search with -m")
        quiet_optuna()
        try:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:
            raise ConfigError(
                f"optuna.study={self.study_name} is not in {self.storage}; run searches with -m"
            ) from None
        study.pruner = make_pruner(study.user_attrs.get("pruner", {}))
        try:
            self._trial = optuna.Trial(study, trial_id(study, int(self.number)))
        except KeyError:
            raise ConfigError(f"optuna.trial={self.number} is not a trial of study {self.study_name}") from None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.number is None or self.pruned_at is not None:
            return
        prune = False
        value = trainer.callback_metrics.get(self.monitor)
        if self._trial is not None and value is not None and math.isfinite(float(value)):
            self._trial.report(float(value), step=trainer.global_step)
            prune = self._trial.should_prune()
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if not prune:
            return
        self.pruned_at = trainer.global_step
        trainer.should_stop = True
        if self._trial is not None:
            self._trial.set_user_attr(PRUNED_AT, trainer.global_step)
            log.info(
                "trial %s pruned at step %d: %s %.4f is worse than the median of earlier trials there; stopping",
                self.number, trainer.global_step, self.monitor, float(value),
            )  # fmt: skip
