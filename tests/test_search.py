"""`python train.py -m hparams_search=lstm`: an Optuna study in SQLite in the sweep folder, continued by the same
command; trials report val/loss and a hopeless one is stopped cleanly and recorded as pruned; the sweeper is found
by Hydra's plugin discovery."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from charlstm.app import pruning, search
from charlstm.app.train import train
from charlstm.core.errors import ConfigError, TrainingInterrupted
from hydra_plugins.charlstm_optuna.optuna_sweeper import CharLSTMOptunaSweeper
from tests.cli import SHRINK, ok, run_cli
from tests.conftest import compose_cfg

optuna.logging.set_verbosity(optuna.logging.WARNING)

# a tiny model validated four times per trial; seq_len, batch size and lr searched in narrow ranges (dropout and
# weight decay in the config's)
SEARCH = ["-m", "hparams_search=lstm", *SHRINK, "data.extra_plays=null", "trainer.max_steps=8",
          "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "model.layers=1",
          "data.seq_len=choice(10,20)", "data.batch_size=choice(8,16)",
          "model.lr=tag(log,interval(0.001,0.01))"]  # fmt: skip


def search_args(sweep_dir: Path, data_dir: Path, n_trials: int, *extra: str) -> list[str]:
    return [*SEARCH, f"hydra.sweep.dir={sweep_dir}", f"paths.data_dir={data_dir}",
            f"hydra.sweeper.n_trials={n_trials}", *extra]  # fmt: skip


def load(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="lstm", storage=f"sqlite:///{sweep_dir / 'study.db'}")


def summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def searched(tmp_path_factory, data_dir):
    """One 3-trial search (shared: the continuation test copies its folder)."""
    root = tmp_path_factory.mktemp("search")
    done = ok(run_cli("train.py", *search_args(root / "sweep", data_dir, 3), cwd=root))
    return root / "sweep", done


def test_search_keeps_its_study_in_sqlite_and_ends_with_a_summary(searched):
    sweep_dir, done = searched
    trials = load(sweep_dir).get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert {"data.seq_len", "data.batch_size", "model.lr"} <= set(trials[0].params)
    assert "model.units" not in trials[0].params  # SHRINK's plain model.units=8 fixes a searched key
    rows = summary(sweep_dir)
    assert sorted(int(r["job"]) for r in rows) == [0, 1, 2]
    assert {r["state"] for r in rows} <= {"complete", "pruned"}
    for row in rows:  # each trial's folder names every searched value, never the trial bookkeeping keys
        folder = sweep_dir / row["folder"]
        assert (folder / "result.json").is_file() and "optuna." not in folder.name
        for key, value in trials[int(row["job"])].params.items():
            assert f"{key.rsplit('.', 1)[-1]}={search.override(key, value).split('=', 1)[1]}" in folder.name
    best = load(sweep_dir).best_trial
    # the best trial's command, as printed: INTERPRETER .../train.py OVERRIDES
    line = next(x for x in done.stdout.splitlines() if x.split()[1:2] and x.split()[1].endswith("train.py"))
    for key, value in best.params.items():
        assert search.override(key, value) in line.split()
    assert "hparams_search" not in line and "choice(" not in line
    # the default sweep folder the search's own one replaces is not left behind, empty, in outputs/multirun/
    assert not (sweep_dir.parent / "outputs").exists()
    assert (sweep_dir / "optuna_history.png").is_file()
    assert (sweep_dir / "summary.png").is_file()


def test_the_same_command_continues_the_study_up_to_n_trials(searched, tmp_path, data_dir):
    first, _ = searched
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(first, sweep_dir)
    done = ok(run_cli("train.py", *search_args(sweep_dir, data_dir, 5), cwd=tmp_path))
    assert "3 of 5 trials done" in done.stdout
    trials = load(sweep_dir).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert [t.params for t in trials[:3]] == [t.params for t in load(first).get_trials()]  # the first 3 untouched
    assert sorted(int(r["job"]) for r in summary(sweep_dir)) == [0, 1, 2, 3, 4]
    assert len([p for p in sweep_dir.iterdir() if (p / "result.json").is_file()]) == 5


def test_a_search_whose_trials_all_fail_says_so_after_the_summary(tmp_path, data_dir):
    done = run_cli("train.py", *search_args(tmp_path / "sweep", data_dir, 2, "data.max_chars=choice(0)"), cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: no trial of study lstm completed (2 failed)")
    rows = summary(tmp_path / "sweep")
    assert [r["state"] for r in rows] == ["failed", "failed"]
    assert all("data.max_chars" in r["error"] for r in rows)


def make_study(tmp_path: Path, other_trial_loss: float) -> tuple[optuna.Study, str, optuna.Trial]:
    """A study with one complete trial that reported ``other_trial_loss`` at every step, and trial 1 running (its
    ``Trial`` object returned, as the sweeper holds it while the job runs)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study, _ = search.open_study(url, "s", "minimize", [], 0, 1, {"name": "median", "startup_trials": 1})
    done = study.ask()
    for step in range(1, 101):
        done.report(other_trial_loss, step)
    study.tell(done, other_trial_loss)
    running = study.ask()
    assert running.number == 1
    return study, url, running


def pruning_cfg(make_cfg, url: str):
    cfg = make_cfg("trainer.max_epochs=-1", "trainer.max_steps=8", "trainer.val_check_interval=2",
                   "trainer.check_val_every_n_epoch=null", "callbacks.text_sample=null")  # fmt: skip
    with open_dict(cfg):
        cfg.callbacks.optuna_pruning = {"_target_": "charlstm.app.pruning.OptunaPruning", "storage": url, "study": "s",
                                        "trial": 1, "monitor": "val/loss"}  # fmt: skip
    return cfg


def test_a_trial_worse_than_the_median_stops_at_that_validation_and_is_told_pruned(tmp_path, make_cfg):
    study, url, running = make_study(tmp_path, other_trial_loss=0.01)
    metrics, objects = train(pruning_cfg(make_cfg, url))
    trainer = objects.trainer
    assert trainer.global_step == 2  # stopped at its first validation, of four
    assert pruning.pruned_at(objects.callbacks) == 2
    assert (objects.output_dir / "checkpoints" / "last.ckpt").is_file()  # a clean stop: checkpoints written
    trial = study.trials[1]
    assert trial.user_attrs[pruning.PRUNED_AT] == 2
    assert trial.intermediate_values == {2: pytest.approx(metrics["val/loss"])}
    CharLSTMOptunaSweeper._tell(study, running, metrics["val/bpc_best"], None, "val/bpc_best")
    assert study.trials[1].state == TrialState.PRUNED


def test_a_trial_better_than_the_median_trains_to_its_end(tmp_path, make_cfg):
    study, url, _ = make_study(tmp_path, other_trial_loss=100.0)
    _, objects = train(pruning_cfg(make_cfg, url))
    assert objects.trainer.global_step == 8
    assert pruning.pruned_at(objects.callbacks) is None
    assert sorted(study.trials[1].intermediate_values) == [2, 4, 6, 8]
    assert pruning.PRUNED_AT not in study.trials[1].user_attrs


def test_a_pruned_run_records_pruned_in_its_result(tmp_path, data_dir):
    """The job's side on its own: a run given a trial of a study prunes itself and exits 0 with state pruned."""
    _, url, _ = make_study(tmp_path, other_trial_loss=0.01)
    done = ok(run_cli("train.py", "hparams_search=lstm", *SHRINK, "data.extra_plays=null", "trainer.max_steps=8",
                      "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", f"paths.data_dir={data_dir}",
                      f"optuna.storage='{url}'", "optuna.study=s", "optuna.trial=1", cwd=tmp_path))  # fmt: skip
    assert "trial 1 pruned at step 2" in done.stdout
    (result_file,) = (tmp_path / "outputs").rglob("result.json")
    result = json.loads(result_file.read_text())
    assert result["state"] == "pruned" and result["pruned_at_step"] == 2 and result["steps"] == 2


def test_a_continued_study_keeps_its_settings_and_direction(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search.open_study(url, "s", "minimize", ["a=1"], 0, 1, {})
    with pytest.raises(ConfigError, match=r"was run with a=1; continue it with the same settings"):
        search.open_study(url, "s", "minimize", ["a=2"], 0, 1, {})
    with pytest.raises(ConfigError, match=r"hydra.sweeper.direction"):
        search.open_study(url, "s", "maximize", ["a=1"], 0, 1, {})


def test_search_space_reads_hydra_sweep_syntax():
    space, fixed = search.search_space(
        {"a": "choice(1, 2)", "b": "range(1, 4)", "c": "tag(log, interval(0.001, 0.1))", "d": "int(interval(8, 64))",
         "e": "range(0.0, 0.55, 0.05)"},
        ["b=2", "e=choice(0.1,0.2)", "f=x"],
    )  # fmt: skip
    assert space["a"] == CategoricalDistribution([1, 2])
    assert "b" not in space and fixed == ["b=2", "f=x"]  # a plain value fixes a searched key
    assert space["c"] == FloatDistribution(0.001, 0.1, log=True)
    assert space["d"] == IntDistribution(8, 64)
    assert space["e"] == CategoricalDistribution([0.1, 0.2])  # the command line's range replaces the config's
    assert search.search_space({}, ["b=range(1,4)"])[0]["b"] == IntDistribution(1, 3)  # Hydra's range: stop excluded
    assert search.search_space({}, ["b=range(0.0,0.55,0.05)"])[0]["b"] == FloatDistribution(0.0, 0.5, step=0.05)
    with pytest.raises(ConfigError, match=r"^model.units=128 is not a search range"):
        search.search_space({"model.units": "128"}, [])
    with pytest.raises(ConfigError, match=r"optuna.trial is set by the Optuna sweeper"):
        search.search_space({"a": "choice(1,2)"}, ["optuna.trial=3"])


def test_lstm_search_composes_and_its_space_parses(tmp_path, monkeypatch):
    # composing merges the search's sweep folder over the default one, which resolves (claims) the default one
    # (a real run then removes it, see test_search_keeps_its_study_in_sqlite_and_ends_with_a_summary): in tmp_path
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg("train", ["hparams_search=lstm"])
    assert cfg.callbacks.optuna_pruning._target_ == "charlstm.app.pruning.OptunaPruning"
    assert cfg.optimized_metric == "val/bpc_best" and cfg.trainer.max_time
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        hydra_cfg = compose("train", ["hparams_search=lstm"], return_hydra_config=True).hydra
    sweeper = OmegaConf.to_container(hydra_cfg.sweeper)
    assert sweeper["_target_"].endswith("CharLSTMOptunaSweeper") and sweeper["direction"] == "minimize"
    space, _ = search.search_space(sweeper["params"], [])
    for key in ("model.units", "model.layers", "model.dropout", "model.lr", "model.weight_decay", "data.seq_len",
                "data.batch_size"):  # fmt: skip
        assert key in space and OmegaConf.select(cfg, key) is not None


def test_cfg_job_prints_the_search_config(tmp_path):
    done = ok(run_cli("train.py", "hparams_search=lstm", "--cfg", "job", cwd=tmp_path))
    job = OmegaConf.create(done.stdout)
    assert job.callbacks.optuna_pruning.monitor == "val/loss" and "optuna" in job


def test_hydra_discovers_the_sweeper():
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)]
    assert "hydra_plugins.charlstm_optuna.optuna_sweeper.CharLSTMOptunaSweeper" in names
    assert "charlstm_optuna.yaml" in ConfigStore.instance().list("hydra/sweeper")


class FakeLauncher:
    """Stands in for Hydra's launcher: each job 'returns' what ``outcomes`` says (a value, or an exception to raise
    as the launcher would let it through)."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.launched: list[tuple[list[str], int]] = []

    def launch(self, batch, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        self.launched.append((list(batch[0]), initial_job_idx))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, JobReturn):
            return [outcome]
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=outcome)]


def test_the_sweeper_tells_the_study_how_each_job_ended(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study, _ = search.open_study(url, "s", "minimize", ["a=1"], 0, 1, {})
    sweeper = CharLSTMOptunaSweeper()
    sweeper.launcher = FakeLauncher(2.5, float("nan"), SystemExit(1), SystemExit(130))
    space = {"x": FloatDistribution(0, 1)}
    for _ in range(3):
        sweeper._run(study, [study.ask(space)], ["a=1"], url, "val/bpc_best")
    with pytest.raises(TrainingInterrupted) as stop:
        sweeper._run(study, [study.ask(space)], ["a=1"], url, "val/bpc_best")
    assert stop.value.exit_code == 130
    overrides, job = sweeper.launcher.launched[0]
    assert job == 0 and overrides[0] == "a=1" and f"optuna.storage='{url}'" in overrides
    assert {"optuna.study='s'", "optuna.trial=0"} <= set(overrides) and overrides[1].startswith("x=")
    trials = study.get_trials()
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.FAIL]
    assert trials[0].value == 2.5
    assert "not a number for val/bpc_best" in trials[1].user_attrs[search.ERROR]
    assert trials[2].user_attrs[search.ERROR] == "exit status 1"
    assert trials[3].user_attrs[search.INTERRUPTED] and trials[4].state == TrialState.WAITING
    assert search.counted(study) == 3


def test_a_job_that_raised_is_told_to_the_study_as_its_error_in_one_line(tmp_path, capfd):
    from hydra.core.utils import JobReturn, JobStatus

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study, _ = search.open_study(url, "s", "minimize", ["a=1"], 0, 1, {})
    sweeper = CharLSTMOptunaSweeper()
    failed = JobReturn(status=JobStatus.FAILED, _return_value=ConfigError("data.max_chars=0\nis too small"))
    sweeper.launcher = FakeLauncher(failed)
    sweeper._run(study, [study.ask({"x": FloatDistribution(0, 1)})], ["a=1"], url, "val/bpc_best")
    (trial,) = study.get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[search.ERROR] == "ConfigError: data.max_chars=0 is too small"
    assert "Error executing job" not in capfd.readouterr().err
