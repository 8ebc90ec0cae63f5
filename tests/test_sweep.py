"""Sweeps and run folders: `python train.py -m ...` names each job folder by its overrides and ends with a ranked
summary (a failed job is a row, the command exits non-zero after it); run folders are claimed atomically."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from charlstm.app import rundir
from charlstm.app.rundir import claim_dir, fixed_keys, job_dirname, safe_name, swept_overrides
from charlstm.app.summary import collect_rows, rank_rows, write_result, write_summary
from tests import forkserver
from tests.cli import cli_env
from tests.conftest import CONFIG_DIR, ROOT, TINY
from tests.test_tensorboard import session_hparams

QUICK = [*TINY, "trainer.max_steps=6", "trainer.enable_progress_bar=false", "callbacks.text_sample=null",
         "sample.length=0"]  # fmt: skip


def train_cli(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    return forkserver.popen([sys.executable, str(ROOT / "train.py"), *args], cwd, cli_env())


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- grid sweeps, end to end --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sweep_names_its_job_folders_and_writes_a_ranked_summary(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    code, out, err = finish(train_cli("-m", *QUICK, "model.units=8,16", "data.seq_len=20",
                                      f"paths.outputs_root={tmp_path}", f"paths.data_dir={data_dir}",
                                      f"hydra.sweep.dir={sweep}"))  # fmt: skip
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0_model.units=8", "1_model.units=16"]
    for job, units in zip(jobs, (8, 16), strict=True):
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        assert ckpt["hyper_parameters"]["units"] == units
        assert (job / "config.yaml").is_file()
        hp = session_hparams(job)
        assert hp["model.units"] == units
        assert hp["data.seq_len"] == 20 and hp["data.batch_size"] == 32 and hp["trainer.max_steps"] == 6
        result = json.loads((job / "result.json").read_text())
        assert result["state"] == "complete" and result["steps"] == ckpt["global_step"]
        assert result["params"] == {"model.units": units}
        assert result["history"] and result["history"][-1][1] == pytest.approx(result["metrics"]["val/bpc"])

    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 2
    assert sorted(r["overrides"] for r in rows) == ["model.units=16", "model.units=8"]
    best = [float(r["val/bpc_best"]) for r in rows]
    assert best == sorted(best) and rows[0]["rank"] == "1"
    for row in rows:
        assert row["state"] == "complete" and int(row["steps"]) > 0 and float(row["train_seconds"]) > 0
        assert (sweep / row["folder"] / "result.json").is_file()
    assert (sweep / "summary.png").stat().st_size > 0
    md = (sweep / "summary.md").read_text()
    assert "| rank | job | overrides | val/bpc_best |" in md and "1_model.units=16" in md
    assert "sweep summary (2 jobs, best val/bpc_best first)" in out


@pytest.mark.slow
def test_a_failed_job_is_a_row_and_the_sweep_exits_non_zero_after_the_summary(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    code, _, err = finish(train_cli("-m", *QUICK, "model.units=-1,8", f"paths.outputs_root={tmp_path}",
                                      f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}"))  # fmt: skip
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert errors[0].startswith("error: job 0 (model.units=-1): model.units=-1 is not allowed")
    assert errors[-1].startswith("error: 1 of 2 sweep jobs did not complete (job 0)")
    assert (sweep / "1_model.units=8" / "checkpoints" / "last.ckpt").is_file()  # the sweep went on
    rows = read_csv(sweep / "summary.csv")
    assert [(r["job"], r["state"]) for r in rows] == [("1", "complete"), ("0", "failed")]
    assert rows[1]["error"].startswith("model.units=-1 is not allowed") and rows[1]["val/bpc_best"] == ""
    assert "failed" in (sweep / "summary.md").read_text()


# -- run folders ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_runs_started_together_get_a_folder_each(tmp_path, data_dir):
    # Both name the same folder (as two runs started in the same second do): one must get it, the other `-1`.
    base = f"hydra.run.dir=${{charlstm.unique_dir:'{tmp_path / 'run'}'}}"
    args = [*QUICK, f"paths.outputs_root={tmp_path}", f"paths.data_dir={data_dir}", base]
    procs = [train_cli(*args, "model.units=8"), train_cli(*args, "model.units=12")]
    for code, _, err in map(finish, procs):
        assert code == 0, err[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run"))
    assert runs == ["run", "run-1"]
    units = set()
    for run in runs:
        saved = OmegaConf.load(tmp_path / run / "config.yaml")
        ckpt = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        assert ckpt["hyper_parameters"]["units"] == saved.model.units
        assert len(list((tmp_path / run).glob("events.out.tfevents.*"))) == 1
        units.add(saved.model.units)
    assert units == {8, 12}


def test_claim_dir_adds_a_suffix_when_the_folder_exists(tmp_path):
    (tmp_path / "12-00-00").mkdir()
    (tmp_path / "12-00-00-1").mkdir()
    assert claim_dir(tmp_path / "12-00-00") == tmp_path / "12-00-00-2"
    assert claim_dir(tmp_path / "new" / "12-00-00") == tmp_path / "new" / "12-00-00"  # parents made
    assert claim_dir(tmp_path / "new" / "12-00-00") == tmp_path / "new" / "12-00-00-1"


def test_a_failed_command_takes_away_the_folders_it_claimed_and_left_unused(tmp_path):
    (tmp_path / "outputs").mkdir()
    sweep = claim_dir(tmp_path / "outputs" / "multirun" / "2024-01-01" / "12-00-00")
    (sweep / "multirun.yaml").write_text("{}")  # Hydra's bookkeeping only: unused
    used = claim_dir(tmp_path / "outputs" / "2024-01-01" / "12-00-00")
    (used / "result.json").write_text("{}")
    other = tmp_path / "outputs" / "2024-01-01" / "11-00-00"  # another run's folder beside it
    other.mkdir()
    rundir.discard_unused(sweep, used)  # (all this process's claims, when called without any)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "outputs", "outputs/2024-01-01", "outputs/2024-01-01/11-00-00", "outputs/2024-01-01/12-00-00",
        "outputs/2024-01-01/12-00-00/result.json",
    ]  # fmt: skip


def test_a_folder_is_claimed_once_per_config_and_a_rank_above_0_takes_rank_0s(tmp_path, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "t").mkdir()  # taken by another command
    cfg = OmegaConf.create({"base": str(tmp_path / "t"), "dir": "${charlstm.unique_dir:${base}}"})
    assert cfg.dir == str(tmp_path / "t-1")
    assert cfg.dir == str(tmp_path / "t-1")  # read again (e.g. by Lightning): the same folder
    copy = OmegaConf.create({"base": str(tmp_path / "t"), "dir": "${charlstm.unique_dir:${base}}"})
    OmegaConf.copy_cache(from_config=cfg, to_config=copy)  # what Hydra does for each job of a multirun
    assert copy.dir == str(tmp_path / "t-1")
    again = OmegaConf.create({"base": str(tmp_path / "t"), "dir": "${charlstm.unique_dir:${base}}"})
    assert again.dir == str(tmp_path / "t-2")  # the next run (a config of its own) claims afresh
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank > 0 that resolves the folder itself never makes a suffix
    rank1 = OmegaConf.create({"base": str(tmp_path / "t"), "dir": "${charlstm.unique_dir:${base}}"})
    assert rank1.dir == str(tmp_path / "t")


def test_the_run_and_sweep_folders_of_the_config_are_claimed_once(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", [f"paths.outputs_root={tmp_path}"], return_hydra_config=True)
    run = Path(cfg.hydra.run.dir)
    assert run.is_dir() and run.parent.parent == tmp_path
    assert Path(cfg.hydra.run.dir) == run  # read again: the same folder, no second one
    sweep = Path(cfg.hydra.sweep.dir)
    assert sweep.is_dir() and sweep.parent.parent == tmp_path / "multirun" and sweep != run
    made = {p for p in tmp_path.rglob("*") if p.is_dir()}
    assert made == {run, run.parent, tmp_path / "multirun", sweep.parent, sweep}


# -- job folder names ----------------------------------------------------------------------------------------------
def test_safe_name_keeps_plain_overrides_and_replaces_anything_else():
    assert safe_name("data.seq_len=50,model.units=64") == "data.seq_len=50,model.units=64"
    assert safe_name("data.path=/home/me/my text.txt") == "data.path=_home_me_my_text.txt"
    assert safe_name("sample.prompt='what\\'s \"this\"?'") == "sample.prompt=_what_s_this"
    assert safe_name("data.path=café/你好.txt") == "data.path=cafe_.txt"
    assert safe_name("../..") == "_"
    for name in (safe_name("a/b c'd\"e\\f:g*h?i<j>k|l\tm\nn你é"), safe_name("x" * 500)):
        assert name.isascii() and not set(name) & set("/ '\"\\:*?<>|\t\n")


def test_safe_name_cuts_long_names_and_keeps_them_distinct():
    long_a, long_b = "model.units=" + "1" * 200 + "a", "model.units=" + "1" * 200 + "b"
    a, b = safe_name(long_a), safe_name(long_b)
    assert len(a) <= 100 and len(b) <= 100 and a != b
    assert a.startswith("model.units=111") and safe_name(long_a) == a


def test_job_folders_name_the_swept_overrides_only():
    # the last override of a key counts: model.units is swept, trainer.max_steps fixed
    fixed = fixed_keys(["model.units=4", "model.units=8,16", "trainer.max_steps=1,2", "data.seq_len=range(10,30,10)",
                        "paths.x=/a", "+tags=[a,b]", "~experiment", "trainer.max_steps=6"])  # fmt: skip
    assert fixed == ["paths.x", "tags", "experiment", "trainer.max_steps"]
    job = ["trainer.max_steps=6", "paths.x=/a", "model.units=16", "+tags=[a,b]", "data.seq_len=20", "~experiment"]
    assert swept_overrides(job, fixed) == ["data.seq_len=20", "model.units=16"]
    assert job_dirname(3, swept_overrides(job, fixed)) == "3_data.seq_len=20,model.units=16"
    assert job_dirname(0, []) == "0"


# -- the summary, from rows ------------------------------------------------------------------------------------------
def test_write_summary_ranks_rows_and_keeps_a_sweepers_extra_columns(tmp_path):
    rows = [
        {"job": 0, "state": "complete", "overrides": "model.units=8 data.path=a", "val/bpc_best": 2.5, "val/bpc": 2.6,
         "steps": 10, "train_seconds": 3.0, "folder": "0_x", "params": {"model.units": 8, "data.path": "a"},
         "history": [(5, 2.9), (10, 2.6)], "trial": 0},
        {"job": 1, "state": "pruned", "overrides": "model.units=16 data.path=b", "val/bpc_best": None,
         "folder": "1_x", "params": {"model.units": 16, "data.path": "b"}, "history": [(5, 3.5)], "trial": 1},
        {"job": 2, "state": "complete", "overrides": "model.units=32 data.path=a", "val/bpc_best": 2.1,
         "val/bpc": 2.2, "steps": 10, "folder": "2_x", "params": {"model.units": 32, "data.path": "a"},
         "history": [(5, 2.4), (10, 2.2)], "trial": 2},
        {"job": 3, "state": "failed", "overrides": "model.units=-1", "error": "model.units=-1 is | not allowed",
         "folder": "3_x", "params": {"model.units": -1}},
    ]  # fmt: skip
    md = write_summary(tmp_path, rows)
    table = read_csv(tmp_path / "summary.csv")
    assert [r["job"] for r in table] == ["2", "0", "1", "3"]
    assert [r["trial"] for r in table] == ["2", "0", "1", ""]
    assert table[3]["error"] == "model.units=-1 is | not allowed"
    text = md.read_text()
    assert "2 of 4 jobs complete" in text and "model.units=-1 is \\| not allowed" in text
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert [r["job"] for r in rank_rows(rows, "val/bpc_best", "maximize")] == [0, 2, 1, 3]


def test_collect_rows_reads_each_job_folder(tmp_path):
    (tmp_path / "1_model.units=16").mkdir()
    write_result(tmp_path / "1_model.units=16", {"job": 1, "state": "complete", "overrides": ["model.units=16"],
                                                 "params": {"model.units": 16}, "steps": 4, "train_seconds": 1.5,
                                                 "metrics": {"val/bpc_best": 3.0, "val/bpc": 3.1, "val/loss": 2.0},
                                                 "history": [[4, 3.1]]})  # fmt: skip
    killed = tmp_path / "0_model.units=8"
    (killed / ".hydra").mkdir(parents=True)
    (killed / ".hydra" / "overrides.yaml").write_text("- model.units=8\n- paths.outputs_root=/x\n")
    (tmp_path / "not-a-job").mkdir()
    rows = collect_rows(tmp_path)
    assert [(r["job"], r["state"], r["overrides"]) for r in rows] == [
        (0, "no result", "model.units=8"), (1, "complete", "model.units=16")]  # fmt: skip
    assert rows[1]["val/bpc_best"] == 3.0 and rows[1]["history"] == [(4, 3.1)]
    assert rows[1]["folder"] == "1_model.units=16"
    assert rank_rows(rows, "val/loss")[0]["job"] == 1
