"""The sweeper's side of an Optuna search (hydra_plugins.charlstm_optuna): the search space in Hydra's sweep
syntax, the study in SQLite beside the jobs (the same command continues it), and what a search leaves at the end:
the summary rows, the best trial as a command, Optuna's plots.

Each job gets ``optuna.storage``, ``optuna.study`` and ``optuna.trial`` and talks to the study itself
(charlstm.pruning), so a job may run in another process or on another machine (submitit) that reaches the storage.
"""

from __future__ import annotations

import logging
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charlstm.errors import ConfigError
from charlstm.pruning import PRUNED_AT, make_pruner, quiet_optuna, trial_id
from charlstm.rundir import override_key

if TYPE_CHECKING:
    import optuna
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"
# trial user attributes written by the sweeper (the job writes charlstm.pruning.PRUNED_AT)
INTERRUPTED = "interrupted"  # the trial was running when its search stopped: not counted, queued again
RETRY_OF = "retry_of"
ERROR = "error"
# the keys through which a job finds its trial; never part of a run's settings (nor of its folder's name)
JOB_KEYS = ("optuna.storage", "optuna.study", "optuna.trial")
SPACE_HELP = "choice(a,b,...), range(start,stop[,step]), interval(low,high) or tag(log,interval(low,high))"


def search_needs_multirun(cfg: DictConfig) -> None:
    """``python train.py hparams_search=lstm`` without ``-m`` would train one plain run: refused, naming the fix (a
    run given its trial, ``optuna.trial=N``, is one trial of a search and runs)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or OmegaConf.select(cfg, "optuna.trial") is not None:
        return
    hydra_cfg = HydraConfig.get()
    choice = hydra_cfg.runtime.choices.get("hparams_search")
    if choice and hydra_cfg.mode == RunMode.RUN:
        args = " ".join(str(o) for o in hydra_cfg.overrides.task)
        raise ConfigError(f"hparams_search={choice} is a search, which runs with -m (without it this would train one "
                          f"plain run): python train.py -m {args}")  # fmt: skip


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
    elif isinstance(value, RangeSweep) and value.step and value.start is not None and value.stop is not None:
        # the number of values, counted without the float error that lets Hydra's own float range reach its stop
        count = math.ceil((value.stop - value.start) / value.step - 1e-9)
        if count > 0 and all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(value.start, value.start + (count - 1) * value.step, step=value.step)
        if count > 0:
            high = float(f"{value.start + (count - 1) * value.step:.12g}")
            return FloatDistribution(float(value.start), high, step=float(value.step))
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
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"hydra.sweeper.direction={direction} is not known; use minimize or maximize")
    the_pruner = make_pruner(pruner)
    storage = optuna.storages.RDBStorage(url)
    try:
        done = storage.get_n_trials(storage.get_study_id_from_name(name))
    except KeyError:
        done = 0
    # a continued search draws new points: the sampler's seed moves on with the number of trials so far
    sampler = optuna.samplers.TPESampler(seed=None if seed is None else seed + done, n_startup_trials=startup_trials)
    study = optuna.create_study(
        storage=storage, study_name=name, direction=direction, sampler=sampler, pruner=the_pruner, load_if_exists=True
    )
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


def best_command(study: optuna.Study, fixed: list[str], script: str = "train.py") -> str | None:
    """``python train.py ...`` with the command line's own settings and the best trial's values."""
    try:
        best = study.best_trial
    except ValueError:  # no complete trial
        return None
    args = [a for a in fixed if override_key(a) != "hparams_search"]
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
