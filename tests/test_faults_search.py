"""Faults of an Optuna search: storages that do not open and empty ranges are one line each; several search
processes share one study, and a trial is run again only when its process is gone (Optuna's heartbeat)."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from charlstm.app import search
from charlstm.core.errors import ConfigError, StorageError
from tests.cli import cli_env, ok, one_line_error, run_cli
from tests.test_search import SEARCH

ROOT = Path(__file__).resolve().parents[1]


def search_cmd(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    return [*SEARCH, f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.data_dir={data_dir}",
            f"paths.outputs_root={tmp_path}", *extra]  # fmt: skip


# -- one line each -----------------------------------------------------------------------------------------------
def test_a_storage_file_that_is_not_a_database_is_one_line(tmp_path, data_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("a text file, not a database\n" * 20)
    done = run_cli("train.py", *search_cmd(tmp_path, data_dir, f"hydra.sweeper.storage=sqlite:///{notes}"),
                   cwd=tmp_path)  # fmt: skip
    line = one_line_error(done)
    assert f"sqlite:///{notes}" in line and "file is not a database" in line and "hydra.sweeper.storage" in line
    assert notes.read_text() == "a text file, not a database\n" * 20  # left as it was


def test_a_storage_url_whose_driver_is_missing_is_one_line(tmp_path, data_dir):
    url = "postgresql://me:secret@localhost/studies"
    done = run_cli("train.py", *search_cmd(tmp_path, data_dir, f"hydra.sweeper.storage={url}"), cwd=tmp_path)
    line = one_line_error(done)
    assert "needs the database driver psycopg, which is not installed: pip install 'psycopg[binary]'" in line
    assert "postgresql://me:***@localhost/studies" in line and "secret" not in line


def test_a_storage_that_is_not_a_url_or_not_a_known_database_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.storage='study.db' is not a database URL"):
        search.open_storage("study.db")
    with pytest.raises(ConfigError, match=r"nosuchdb is not a database SQLAlchemy knows"):
        search.open_storage("nosuchdb://host/x")
    with pytest.raises(ConfigError, match=r"cannot be opened \(unable to open database file\)"):
        search.open_storage(f"sqlite:///{tmp_path / 'missing' / 'study.db'}")


def test_an_empty_range_is_one_line(tmp_path, data_dir):
    done = run_cli("train.py", *search_cmd(tmp_path, data_dir, "model.units=interval(64,16)"), cwd=tmp_path)
    line = one_line_error(done)
    assert line == (
        "error: model.units=interval(64,16) is an empty range: its low 64 is above its high 16; write interval(16,64)"
    )
    with pytest.raises(ConfigError, match=r"^a=range\(5,2\) is an empty range"):
        search.search_space({}, ["a=range(5,2)"])
    with pytest.raises(ConfigError, match=r"^a=tag\(log,interval\(0,1\)\) is on a log scale, which needs a low above"):
        search.search_space({}, ["a=tag(log,interval(0,1))"])


# -- heartbeats ----------------------------------------------------------------------------------------------------
def age_heartbeats(db: Path, seconds: int) -> None:
    """Move every heartbeat recorded in the study's SQLite file ``seconds`` into the past (a process gone since)."""
    with sqlite3.connect(db) as con:
        changed = con.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?)", (f"-{seconds} seconds",)
        ).rowcount
    assert changed > 0


def test_a_running_trial_whose_process_sends_heartbeats_is_left_to_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first, storage = search.open_study(url, "s", "minimize", ["a=1"], 0, 1, {})
    trial = first.ask({"x": FloatDistribution(0, 1)})
    with search.heartbeats(storage, first, [trial]):
        second, _ = search.open_study(url, "s", "minimize", ["a=1"], 0, 1, {})  # another worker joins
        assert second.trials[0].state == TrialState.RUNNING and search.INTERRUPTED not in second.trials[0].user_attrs
        first.tell(trial, 0.5)  # its own process ends it
    assert first.trials[0].state == TrialState.COMPLETE and len(first.trials) == 1


def test_a_heartbeat_the_storage_refuses_is_tried_again_without_a_traceback(tmp_path, monkeypatch):
    study, storage = search.open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", "minimize", ["a=1"], 0, 1, {},
                                       heartbeat_interval=1)  # fmt: skip
    trial = study.ask({"x": FloatDistribution(0, 1)})
    real, calls, crashed = storage.record_heartbeat, [], []

    def refused_once(trial_id):  # the first beat meets a locked storage (another process stopped inside a write)
        calls.append(trial_id)
        if len(calls) == 1:
            raise optuna.exceptions.StorageInternalError("database is locked")
        real(trial_id)

    monkeypatch.setattr(storage, "record_heartbeat", refused_once)
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    with search.heartbeats(storage, study, [trial]):
        time.sleep(1.5)
    assert len(calls) >= 2 and not crashed


def test_a_trial_whose_process_is_gone_runs_again_and_is_not_counted(tmp_path):
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    study, storage = search.open_study(url, "s", "minimize", ["a=1"], 0, 1, {}, heartbeat_interval=1)
    study.tell(study.ask({"x": FloatDistribution(0, 1)}), 0.5)
    left = study.ask({"x": FloatDistribution(0, 1)})
    with search.heartbeats(storage, study, [left]):  # its heartbeat is recorded in the storage
        pass
    age_heartbeats(db, 10)  # the process died: no heartbeat for 10 s, more than twice the interval
    study, _ = search.open_study(url, "s", "minimize", ["a=1"], 0, 1, {}, heartbeat_interval=1)
    assert study.trials[1].state == TrialState.FAIL and study.trials[1].user_attrs[search.INTERRUPTED]
    assert search.counted(study) == 1
    again = study.ask({"x": FloatDistribution(0, 1)})
    assert again.number == 2 and again.params == left.params and again.user_attrs[search.RETRY_OF] == 1


def running(db: Path, beating: bool = False) -> list[int]:
    """The numbers of the trials running in the study's SQLite file (with ``beating``, those whose heartbeat has
    started), read without writing to it."""
    query = "SELECT t.number FROM trials t WHERE t.state = 'RUNNING'"
    if beating:
        query += " AND t.trial_id IN (SELECT trial_id FROM trial_heartbeats)"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return [n for (n,) in con.execute(query)]
    except sqlite3.OperationalError:  # not made yet
        return []


def start_search(tmp_path: Path, data_dir: Path, n_trials: int, *extra: str) -> subprocess.Popen:
    args = search_cmd(tmp_path, data_dir, f"hydra.sweeper.n_trials={n_trials}", *extra)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def unlocked(db: Path) -> bool:
    """No process holds a lock on the SQLite file: one stopped inside a write (or a read) would keep it forever."""
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=0.2, isolation_level=None)) as con:
            con.execute("BEGIN EXCLUSIVE")
            con.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False


def stop_during_a_trial(proc: subprocess.Popen, db: Path, signum: int) -> int:
    """Send ``signum`` (SIGSTOP or SIGKILL) to the search ``proc`` while one of its trials is running; its number.
    A process stopped in the middle of one of its writes to the study holds SQLite's lock until it goes on, so
    SIGSTOP is only kept where the file is left unlocked (SQLite cannot let others write past such a lock)."""
    beating = signum == signal.SIGKILL  # a process gone before its trial's first heartbeat leaves it running
    while proc.poll() is None:
        if running(db, beating):
            proc.send_signal(signum)
            time.sleep(0.5)  # the signal lands
            numbers = running(db, beating)
            if numbers and (signum != signal.SIGSTOP or unlocked(db)):
                return numbers[0]
            if signum == signal.SIGSTOP:  # the trial ended just before, or a write was under way: try again
                proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"the search ended before a trial could be caught running:\n{proc.communicate()[1][-3000:]}")


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_two_search_processes_on_one_study_both_run_to_the_end(tmp_path, data_dir):
    db = tmp_path / "sweep" / "study.db"
    first = start_search(tmp_path, data_dir, 4)
    caught = stop_during_a_trial(first, db, signal.SIGSTOP)  # the first stands still with a trial running ...
    try:
        second = ok(finish(start_search(tmp_path, data_dir, 4)))  # ... while a second runs the study to its end
    finally:
        first.send_signal(signal.SIGCONT)
    ok(finish(first))  # then the first finishes its trial and tells the study
    study = optuna.load_study(study_name="lstm", storage=f"sqlite:///{db}")
    states = {t.number: t.state for t in study.trials}
    assert states[caught] == TrialState.COMPLETE and not study.trials[caught].user_attrs.get(search.INTERRUPTED)
    assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states.values()), states
    assert search.counted(study) >= 4 and "UpdateFinishedTrialError" not in second.stderr


def test_a_trial_of_a_killed_search_process_runs_again_in_another(tmp_path, data_dir):
    db = tmp_path / "sweep" / "study.db"
    first = start_search(tmp_path, data_dir, 3, "hydra.sweeper.heartbeat_interval=1")
    killed = stop_during_a_trial(first, db, signal.SIGKILL)
    first.communicate()
    age_heartbeats(db, 10)  # its heartbeats stopped (more than twice the interval ago)
    ok(finish(start_search(tmp_path, data_dir, 3, "hydra.sweeper.heartbeat_interval=1")))
    study = optuna.load_study(study_name="lstm", storage=f"sqlite:///{db}")
    assert study.trials[killed].state == TrialState.FAIL and study.trials[killed].user_attrs[search.INTERRUPTED]
    (retry,) = [t for t in study.trials if t.user_attrs.get(search.RETRY_OF) == killed]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.params == study.trials[killed].params
    assert search.counted(study) == 3


def test_a_write_refused_by_a_locked_storage_is_one_line_naming_it_and_the_fix(tmp_path):
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    # a short wait for the lock (the search waits 60 s), and a real write refused by Optuna
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 0.2}})
    study = optuna.create_study(storage=storage, study_name="s")
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")  # another process holds the lock, e.g. stopped inside a write
        with pytest.raises(optuna.exceptions.StorageInternalError) as caught:
            study.ask()
        other.execute("ROLLBACK")
    err = search.storage_failure(url, caught.value)
    assert isinstance(err, StorageError) and "\n" not in str(err)
    assert str(err).startswith(f"the study's storage {url} could not be written (database is locked); ")
    assert "continue it (fg) or end it, then the same command continues the study" in str(err)
    assert unlocked(db) and not unlocked_while_held(db)


def unlocked_while_held(db: Path) -> bool:
    """The test's own lock probe sees a lock held by another connection (or the tests above prove nothing)."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            return unlocked(db)
        finally:
            other.execute("ROLLBACK")


def test_a_storage_locked_when_the_search_opens_it_is_one_line_that_keeps_the_study(tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def locked(url, **settings):  # what RDBStorage raises after SQLite's 60-s wait for another process's lock
        raise OperationalError("SELECT version_info", {}, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", locked)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(ConfigError) as caught:
        search.open_storage(url)
    assert str(caught.value) == (
        f"the study's storage {url} cannot be opened (database is locked); if another search process on it is "
        "stopped, continue it (fg) or end it, then the same command continues the search"
    )  # not "move that one away", which would leave the study behind


def test_a_new_storage_opened_by_two_processes_at_once_is_made_once(tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    made = []
    real = optuna.storages.RDBStorage

    def racing(url, **settings):  # the other process made the tables between this one's check and its own CREATE
        if not made:
            made.append(real(url, **settings))
            raise OperationalError("CREATE TABLE version_info", {}, Exception("table version_info already exists"))
        return real(url, **settings)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = search.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert storage.get_heartbeat_interval() == search.HEARTBEAT_SECONDS and len(made) == 1
