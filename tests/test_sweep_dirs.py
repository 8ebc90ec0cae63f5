"""A sweep's own jobs: swept data.* keys name their jobs on data=file too, long names keep every swept value, one
sweep at a time writes into a sweep folder (a rerun after kill -9 summarizes its own jobs only), and an
interrupted job's row keeps the metrics it reached."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from charlstm.app.rundir import fixed_keys, job_dirname, safe_name, swept_overrides
from charlstm.app.search import JOB_KEYS, distribution, override
from tests.cli import one_line_error
from tests.conftest import CONFIG_DIR
from tests.test_sweep import QUICK, finish, read_csv, train_cli


def sweep_args(tmp_path: Path, data_dir: Path, sweep: Path, *extra: str) -> list[str]:
    return ["-m", *QUICK, f"paths.outputs_root={tmp_path}", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}",
            *extra]  # fmt: skip


# -- data.* swept on data=file ----------------------------------------------------------------------------------
def test_a_group_chosen_on_the_command_line_leaves_its_keys_swept():
    grid = fixed_keys(["data=file", "data.path=my.txt", "data.seq_len=20,30", "model=lstm", "model.units=8,16"])
    job = ["data=file", "data.path=my.txt", "data.seq_len=30", "model=lstm", "model.units=8"]
    assert swept_overrides(job, grid) == ["data.seq_len=30", "model.units=8"]
    # an Optuna search: the searched keys are not on the command line, the trial's bookkeeping keys are fixed
    search = [*fixed_keys(["hparams_search=lstm", "data=file", "data.path=my.txt"]), *JOB_KEYS]
    trial = ["hparams_search=lstm", "data=file", "data.path=my.txt", "data.seq_len=100", "optuna.trial=3"]
    assert swept_overrides(trial, search) == ["data.seq_len=100"]
    assert swept_overrides(["paths.outputs_root=/x", "data.seq_len=5"]) == ["data.seq_len=5"]  # no command known


@pytest.mark.slow
def test_a_data_sweep_on_a_file_names_its_jobs_and_fills_the_summary(tmp_path, data_dir):
    text = tmp_path / "my.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(120)))
    sweep = tmp_path / "sweep"
    code, _, err = finish(train_cli(*sweep_args(tmp_path, data_dir, sweep, "data=file", f"data.path={text}",
                                                "data.seq_len=20,30")))  # fmt: skip
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_data.seq_len=20", "1_data.seq_len=30"]
    for num, seq_len in enumerate((20, 30)):
        result = json.loads((sweep / f"{num}_data.seq_len={seq_len}" / "result.json").read_text())
        assert result["overrides"] == [f"data.seq_len={seq_len}"] and result["params"] == {"data.seq_len": seq_len}
    rows = read_csv(sweep / "summary.csv")
    assert sorted(r["overrides"] for r in rows) == ["data.seq_len=20", "data.seq_len=30"]


# -- long names --------------------------------------------------------------------------------------------------
def test_a_search_trial_folder_shows_every_searched_value():
    # the lstm search space, each key at its longest value: the full keys would need more than 100 chars
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        params = compose("train", ["hparams_search=lstm"], return_hydra_config=True).hydra.sweeper.params
    longest = {}
    for key, text in params.items():
        dist = distribution(key, str(text))
        # a float with four significant digits is as long as a searched float gets
        values = getattr(dist, "choices", None) or [dist.low, dist.high]
        if not hasattr(dist, "choices") and isinstance(dist.low, float):
            values.append(dist.low + (dist.high - dist.low) * 0.123456)
        longest[key] = max((override(key, v) for v in values), key=len)
    overrides = swept_overrides(sorted(longest.values()), fixed=[])
    assert len(",".join(overrides)) > 100
    name = job_dirname(12, overrides)
    assert name == "12_" + safe_name(name[3:]) and len(name) <= 103  # not cut, no hash
    for key, text in longest.items():
        assert f"{key.rsplit('.', 1)[-1]}={text.split('=', 1)[1]}" in name.split("_", 1)[1].split(",")
    # a short name stays as it was; keys that share their last part keep enough of the key to tell them apart
    assert job_dirname(0, ["data.seq_len=50", "model.units=64"]) == "0_data.seq_len=50,model.units=64"
    long = ["callbacks.early_stopping.patience=" + "1" * 40, "model.plateau_patience=2", "trainer.x.patience=3"]
    assert job_dirname(1, long).startswith("1_early_stopping.patience=111")
    assert job_dirname(1, long).endswith("1,plateau_patience=2,x.patience=3")


# -- one sweep at a time in a sweep folder ---------------------------------------------------------------------
def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


@pytest.mark.slow
def test_one_sweep_at_a_time_in_a_sweep_folder_and_a_rerun_after_kill_9_summarizes_its_own_jobs(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    long = ["trainer.max_steps=100000", "trainer.max_epochs=1000", "callbacks.early_stopping=null"]
    first = train_cli(*sweep_args(tmp_path, data_dir, sweep, "model.units=8,12", *long))
    try:
        wait_for(sweep / "0_model.units=8" / "config.yaml")  # its first job is training
        second = finish(train_cli(*sweep_args(tmp_path, data_dir, sweep, "model.units=16")))
    finally:
        first.kill()  # kill -9: the kernel drops its lock
        first.wait(60)
    line = one_line_error(subprocess.CompletedProcess([], *second))
    assert line.startswith(f"error: hydra.sweep.dir={sweep} is in use by another sweep (process ")
    assert line.endswith("wait for it to end, or give this one another hydra.sweep.dir")
    assert not (sweep / "0_model.units=16").exists()

    code, out, err = finish(train_cli(*sweep_args(tmp_path, data_dir, sweep, "model.units=8,12")))
    assert code == 0, err[-3000:]
    assert "did not complete" not in err
    rows = read_csv(sweep / "summary.csv")
    assert sorted((r["job"], r["state"], r["folder"]) for r in rows) == [
        ("0", "complete", "0_model.units=8-1"), ("1", "complete", "1_model.units=12")]  # fmt: skip
    assert not (sweep / "0_model.units=8" / "result.json").exists()  # the killed job's folder is left as it was
    assert "sweep summary (2 jobs" in out


# -- an interrupted job -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_interrupted_job_keeps_the_metrics_it_reached(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    stop = ["+callbacks.stop._target_=tests.test_interrupt.SendSignal", "+callbacks.stop.step=4",
            "+callbacks.stop.signum=2"]  # fmt: skip
    code, _, err = finish(train_cli(*sweep_args(tmp_path, data_dir, sweep, "model.units=8,12", "trainer.max_steps=20",
                                                "trainer.val_check_interval=2", *stop)))  # fmt: skip
    assert code == 130, err[-3000:]
    result = json.loads((sweep / "0_model.units=8" / "result.json").read_text())
    assert result["state"] == "interrupted" and result["steps"] == 4
    assert [step for step, _ in result["history"]] == [2]  # validated at step 2; stopped at the end of step 4
    assert result["metrics"]["val/bpc"] == pytest.approx(result["history"][-1][1])
    rows = read_csv(sweep / "summary.csv")
    assert [(r["job"], r["state"], r["steps"]) for r in rows] == [("0", "interrupted", "4")]
    assert float(rows[0]["val/bpc_best"]) == pytest.approx(result["metrics"]["val/bpc_best"])
