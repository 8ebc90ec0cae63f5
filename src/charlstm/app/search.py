"""The sweeper's side of an Optuna search (hydra_plugins.charlstm_optuna): the search space in Hydra's sweep
syntax, the study in SQLite beside the jobs (the same command continues it), and what a search leaves at the end:
the summary rows, the best trial as a command, Optuna's plots.

Each job gets ``optuna.storage``, ``optuna.study`` and ``optuna.trial`` and talks to the study itself
(charlstm.app.pruning), so a job may run in another process or on another machine (submitit) that reaches the storage.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charlstm.app.pruning import PRUNED_AT, make_pruner, quiet_optuna, trial_id
from charlstm.app.rundir import override_key
from charlstm.core.errors import ConfigError, StorageError

if TYPE_CHECKING:
    import optuna
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"
# trial user attributes written by the sweeper (the job writes charlstm.app.pruning.PRUNED_AT)
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
        from charlstm.app.cli import command_line

        again = command_line("train.py", "-m", *(str(o) for o in hydra_cfg.overrides.task))
        raise ConfigError(f"hparams_search={choice} is a search, which runs with -m (without it this would train one "
                          f"plain run): {again}")  # fmt: skip


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
        raise ConfigError(
            f"{key}={text} is an empty range: no value from {value.start} up to (not including) {value.stop} in "
            f"steps of {value.step}; give a stop beyond the start"
        )
    elif isinstance(value, IntervalSweep) and value.start is not None and value.end is not None:
        log_scale = "log" in value.tags
        if value.start > value.end:
            raise ConfigError(
                f"{key}={text} is an empty range: its low {value.start:g} is above its high {value.end:g}; write "
                f"interval({value.end:g},{value.start:g})"
            )
        if log_scale and value.start <= 0:
            raise ConfigError(f"{key}={text} is on a log scale, which needs a low above 0 (it is {value.start:g})")
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
    from charlstm.app.cli import quote_value

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


# Every running trial records a heartbeat in the study's storage (Optuna's own, for RDB storages) this often; one
# silent for GRACE_FACTOR heartbeats belongs to a process that is gone: it is failed, marked interrupted and queued
# again by whichever search process sees it first. So several search processes can share one study (Optuna's way
# of running parallel workers) and none takes away another's running trial.
HEARTBEAT_SECONDS = 60
# Python packages of the database drivers SQLAlchemy imports, where the package's name differs from the module's
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}


# what to do when a SQLite study is locked by another process (one stopped with Ctrl-Z in the middle of a write keeps
# the lock until it goes on)
LOCKED_FIX = "if another search process on it is stopped, continue it (fg) or end it, then the same command continues"


def database_said(err: BaseException) -> str:
    """The first line of what the database said (SQLAlchemy keeps the driver's error as ``orig``)."""
    return " ".join(str(getattr(err, "orig", None) or err).split("\n")[0].split())


def storage_failure(url: str, err: BaseException) -> StorageError:
    """Optuna's StorageInternalError (a write to the study that failed, the database's reason as its cause) as one
    line."""
    from sqlalchemy.engine import make_url

    why = database_said(err.__cause__ if err.__cause__ is not None else err)
    shown = make_url(url).render_as_string(hide_password=True)
    return StorageError(f"the study's storage {shown} could not be written ({why}); {LOCKED_FIX} the study")


def open_storage(url: str, heartbeat_interval: int | None = HEARTBEAT_SECONDS) -> optuna.storages.RDBStorage:
    """The study's storage with Optuna's heartbeat; a URL that does not open is one line saying why."""
    import optuna

    quiet_optuna()  # the heartbeat is an experimental argument
    # ask-and-tell with a heartbeat: the search records the running trials' heartbeats itself (heartbeats below)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"hydra.sweeper.storage={url!r} is not a database URL; write e.g. sqlite:///PATH/study.db or "
            "postgresql://USER@HOST/DB (null: SQLite in the sweep folder)"
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    sqlite = parsed.get_backend_name() == "sqlite"
    # several search processes on one SQLite file wait for each other's writes (5 s by default)
    settings = {"heartbeat_interval": heartbeat_interval,
                "engine_kwargs": {"connect_args": {"timeout": 60}} if sqlite else None}  # fmt: skip
    try:
        try:
            return optuna.storages.RDBStorage(url, **settings)
        except SQLAlchemyError as err:  # another process made the tables of the new storage at the same moment
            if "already exists" not in str(err):
                raise
            return optuna.storages.RDBStorage(url, **settings)
    except ImportError as err:
        module = getattr(err.__cause__, "name", None) or parsed.drivername
        package = DRIVER_PACKAGES.get(str(module).split(".")[0], str(module).split(".")[0])
        raise ConfigError(
            f"the study's storage {shown} needs the database driver {module}, which is not installed: "
            f"pip install '{package}' (or use SQLite: hydra.sweeper.storage=sqlite:///PATH/study.db)"
        ) from None
    except NoSuchModuleError:
        raise ConfigError(
            f"the study's storage {shown}: {parsed.drivername} is not a database SQLAlchemy knows; write e.g. "
            "sqlite:///PATH/study.db or postgresql://USER@HOST/DB"
        ) from None
    except SQLAlchemyError as err:
        why = database_said(err)
        fix = "give hydra.sweeper.storage another file or move that one away" if sqlite else "check the URL"
        if "locked" in why:
            fix = f"{LOCKED_FIX} the search"
        raise ConfigError(f"the study's storage {shown} cannot be opened ({why}); {fix}") from None


def requeue_stale(study: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
    """Trials whose process is gone (no heartbeat for two heartbeat intervals) are marked ``interrupted`` (not
    counted) and failed, and their settings queued to run again as a new trial; of several search processes that
    see one at once, one does it. ``storage`` is the one the study was opened with (:func:`open_study`)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    if storage.get_heartbeat_interval() is None:
        return
    # Optuna's public optuna.storages.fail_stale_trials fails a trial before its callback runs, and a finished trial
    # takes no more attributes: its steps (RDBStorage's private list of stale trials, the one private call left,
    # then a change of state that one process wins) in the order that keeps `interrupted` on the trial
    # (tests/test_faults_search.py fails if Optuna renames or changes it)
    for stale_id in storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name)):
        try:
            storage.set_trial_user_attr(stale_id, INTERRUPTED, True)
            if not storage.set_trial_state_values(stale_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another process failed it first (or its own ended it)
            continue
        trial = storage.get_trial(stale_id)
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
        log.info("trial %d was running in a search process that is gone: it runs again as a new trial", trial.number)


@contextlib.contextmanager
def heartbeats(storage: optuna.storages.RDBStorage, study: optuna.Study, trials: list[optuna.Trial]) -> Iterator[None]:
    """Record the heartbeats of ``trials`` in ``storage`` while they run, every heartbeat interval, from one thread
    (Study.optimize does this itself; an ask-and-tell loop must)."""
    import threading

    import optuna

    interval = storage.get_heartbeat_interval()
    if interval is None:
        yield
        return
    ids = [trial_id(storage, study.study_name, t.number) for t in trials]
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                for i in ids:
                    storage.record_heartbeat(i)
            except optuna.exceptions.StorageInternalError:  # locked: the next beat tries again, and the search's
                pass  # own write, which fails the same way, says so in one line
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="trial-heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def stored(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """A trial as the storage has it now (a ``Trial`` object from ``ask`` keeps what it saw then: it misses what
    the job wrote since, e.g. that the pruner stopped it); the study reads its unfinished trials afresh."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def open_study(
    url: str, name: str, direction: str, fixed: list[str], seed: int | None, startup_trials: int,
    pruner: dict[str, Any], heartbeat_interval: int | None = HEARTBEAT_SECONDS,
) -> tuple[optuna.Study, optuna.storages.RDBStorage]:  # fmt: skip
    """Create the study or continue it; with the storage it was opened with (the study keeps its own private), for
    the heartbeats. A continued study must keep its direction and the command line's settings (else its trials would
    not compare); trials left running by a search process that is gone (no heartbeat) are failed and queued again."""
    import optuna

    quiet_optuna()
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"hydra.sweeper.direction={direction} is not known; use minimize or maximize")
    the_pruner = make_pruner(pruner)
    storage = open_storage(url, heartbeat_interval)
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
    requeue_stale(study, storage)
    return study, storage


def mark_interrupted(study: optuna.Study, trial: optuna.Trial) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr(INTERRUPTED, True)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})


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
    """The sweep summary's rows (charlstm.app.summary): one per trial that ran, from its job's ``result.json``, in the
    state the study gave it. An interrupted trial is left out: it ran again under a new number."""
    from charlstm.app.summary import collect_rows

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
    """``train.py ...`` with the command line's own settings and the best trial's values, as a line that works when
    pasted into a shell."""
    try:
        best = study.best_trial
    except ValueError:  # no complete trial
        return None
    args = [a for a in fixed if override_key(a) != "hparams_search"]
    args += [override(k, v) for k, v in best.params.items()]
    from charlstm.app.cli import command_line

    return command_line(script, *args)


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
