"""What the commands print, as a user sees it: each command's own --help, paths typed with `~`, the model line
instead of Lightning's table, no library line that repeats the run's own, one line per refusal, control chars
escaped in samples, and a resume line that works as printed in a fresh shell."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from charlstm.app.train import train
from tests import forkserver
from tests.cli import ROOT, SHRINK, cli_env, ok, on_a_terminal, one_line_error, run_cli, run_folders
from tests.conftest import compose_cfg

# config groups of train.py that generate.py and eval.py do not take
TRAINING_GROUPS = ("experiment", "trainer", "hparams_search", "callbacks", "logger", "model", "debug")


def yaml_text(value) -> str:
    return '""' if value == "" else OmegaConf.to_yaml({"v": value}).strip()[len("v: ") :]


@pytest.mark.parametrize("script", ["generate", "eval"])
def test_help_lists_the_commands_own_settings_with_their_defaults(script, tmp_path):
    done = ok(run_cli(f"{script}.py", "--help", cwd=tmp_path))
    text = done.stdout
    assert text.startswith(f"python {script}.py ")
    for group in TRAINING_GROUPS:
        assert not re.search(rf"^{group}: |\b{group}[=.]", text, re.M), group  # Hydra's listing, or a setting
    settings = {m[1]: m[3] for m in re.finditer(r"^  ([a-z_.]+)=(\S*)\s.*?(?:\[(.*)\])?$", text, re.M)}
    cfg = compose_cfg(script)
    keys = [k for k in cfg if k not in ("hydra", "paths", "data")]  # eval's data is listed key by key
    assert all(f"data.{k}=" in text for k in cfg.get("data") or {}), cfg.get("data")
    assert set(keys) <= set(settings), sorted(set(keys) - set(settings))
    for key in keys:  # each line says its default, which is the config's
        assert settings[key] == yaml_text(cfg[key]), key
    if script == "eval":  # the texts eval.py can score, one line each
        for option in sorted(p.stem for p in (ROOT / "configs" / "data").glob("*.yaml")):
            assert f"  data={option} " in text
        assert "  data.path=" in text or "data.path=FILE" in text


@pytest.fixture(scope="module")
def home_run(tmp_path_factory) -> dict:
    """A run trained on ~/my.txt, typed unquoted, with HOME set to a folder of its own."""
    home = tmp_path_factory.mktemp("home")
    (home / "my.txt").write_text("a small text of my own, line after line.\n" * 150, encoding="utf-8")
    done = forkserver.run(
        [sys.executable, str(ROOT / "train.py"), "data=file", "data.path=~/my.txt", "trainer.max_steps=5", *SHRINK],
        home, cli_env(HOME=str(home)), timeout=240,
    )  # fmt: skip
    return {"home": home, "done": done, "runs": run_folders(home / "outputs")}


def in_home(home_run, script: str, *args: str) -> subprocess.CompletedProcess:
    home = home_run["home"]
    return forkserver.run([sys.executable, str(ROOT / script), *args], home, cli_env(HOME=str(home)), timeout=240)


@pytest.mark.slow
def test_paths_typed_with_tilde_work_unquoted(home_run):
    ok(home_run["done"])
    (run,) = home_run["runs"]
    # the run records its corpus by its absolute path (a resume from another folder finds it)
    assert OmegaConf.load(run / "config.yaml").data.path == str(home_run["home"] / "my.txt")
    ckpt = "~/" + (run / "checkpoints" / "last.ckpt").relative_to(home_run["home"]).as_posix()
    score = ok(in_home(home_run, "eval.py", f"ckpt={ckpt}", "data=file", "data.path=~/my.txt"))
    assert score.stdout.startswith("bits/char ")
    (home_run["home"] / "opening.txt").write_text("a small", encoding="utf-8")
    ok(in_home(home_run, "generate.py", f"ckpt={ckpt}", "prompt_file=~/opening.txt", "length=5", "output=~/out.txt"))
    assert (home_run["home"] / "out.txt").read_text(encoding="utf-8").startswith("a small")
    done = ok(in_home(home_run, "train.py", f"ckpt_path={ckpt}", "trainer.max_steps=8", "sample.length=0"))
    assert "step 8" in done.stdout
    line = one_line_error(in_home(home_run, "train.py", "data=file", "data.path=~/missing.txt"))
    assert f"{home_run['home'] / 'missing.txt'} does not exist" in line


@pytest.mark.slow
def test_eval_says_which_checkpoint_last_picked(home_run):
    ok(home_run["done"])
    (run,) = home_run["runs"]
    done = ok(in_home(home_run, "eval.py", "ckpt=last"))
    assert done.stderr.strip() == f"checkpoint: {run / 'checkpoints' / 'last.ckpt'}"
    assert done.stdout.startswith("bits/char ") and len(done.stdout.strip().splitlines()) == 1
    done = ok(in_home(home_run, "eval.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}"))
    assert done.stderr == ""  # a path given is not repeated


# Lightning's lines that repeat what the run prints itself; kept in train.log
REPEATS = ("`Trainer.fit` stopped", "Time limit reached", "Loading `train_dataloader` to estimate")
MODEL_LINE = re.compile(
    r"^model: 2 x 8 LSTM \(embedding input, (\d+) chars\), ([\d,]+) parameters \([\d.]+ KB\), precision \S+$", re.M
)


@pytest.fixture(scope="module")
def control_run(tmp_path_factory) -> dict:
    """The default recipe, with its time budget, on a file whose every line holds a bell and an escape sequence."""
    cwd = tmp_path_factory.mktemp("control")
    (cwd / "term.txt").write_text("ring\a the bell, \x1b[31mred\x1b[0m text\n" * 200, encoding="utf-8")
    done = run_cli("train.py", "data=file", "data.path=term.txt", "trainer.max_time=00:00:00:03", *SHRINK, cwd=cwd)
    return {"cwd": cwd, "done": done, "runs": run_folders(cwd / "outputs")}


@pytest.mark.slow
def test_samples_on_the_console_show_control_chars_escaped(control_run):
    done = ok(control_run["done"])
    assert "\a" not in done.stdout and "\x1b" not in done.stdout
    # the samples start from the first line of the validation text
    assert re.search(r"^sample at epoch \d+, step \d+:\nring\\x07 the bell, \\x1b\[31mred", done.stdout, re.M)
    assert re.search(r"^sample \(temperature 0\.8\):\nring\\x07 the bell, \\x1b\[31mred", done.stdout, re.M)


@pytest.mark.slow
def test_generate_escapes_control_chars_on_a_terminal_only(control_run):
    (run,) = control_run["runs"]
    args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "prompt=ring\a \x1b[31mred", "length=3"]
    piped = ok(run_cli("generate.py", *args, cwd=control_run["cwd"]))
    assert piped.stdout.startswith("ring\a \x1b[31mred")  # a file or a pipe gets the text as it is
    status, shown = on_a_terminal([sys.executable, str(ROOT / "generate.py"), *args], control_run["cwd"], cli_env())
    assert status == 0
    assert shown.startswith("ring\\x07 \\x1b[31mred") and "\a" not in shown and "\x1b" not in shown


@pytest.mark.slow
def test_training_prints_the_model_line_not_lightnings_table_nor_its_repeats(control_run):
    done = ok(control_run["done"])
    (run,) = control_run["runs"]
    assert "Time limit reached" in (run / "train.log").read_text(encoding="utf-8")  # the run did stop on its budget
    for line in (*REPEATS, "FLOPs", "Total params", "Trainable params"):
        assert line not in done.stdout and line not in done.stderr, line
    model = MODEL_LINE.findall(done.stdout)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("net."))
    assert model == [(str(len(ckpt["hyper_parameters"]["vocab"])), f"{params:,}")]


def test_model_summary_false_prints_no_model_line(make_cfg, caplog):
    with caplog.at_level(logging.INFO):
        train(make_cfg("trainer.max_steps=2", "trainer.enable_model_summary=true"))
    shown = [r.getMessage() for r in caplog.records]
    assert len([m for m in shown if m.startswith("model: 2 x 16 LSTM")]) == 1
    assert not [m for m in shown if "FLOPs" in m or "Total params" in m]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(make_cfg("trainer.max_steps=2", "trainer.enable_model_summary=false"))
    assert not [r for r in caplog.records if r.getMessage().startswith("model: ") or "FLOPs" in r.getMessage()]


@pytest.mark.slow
def test_a_refused_search_prints_its_error_once(tmp_path):
    search = ["-m", "hparams_search=lstm", "hydra.sweeper.n_trials=0"]
    ok(run_cli("train.py", *search, "model.layers=1", cwd=tmp_path))
    done = run_cli("train.py", *search, "model.layers=2", cwd=tmp_path)
    line = one_line_error(done)
    assert line.startswith("error: study lstm in ") and "was run with hparams_search=lstm model.layers=1" in line
    assert "was run with" not in done.stdout  # not a second time through Hydra's log


@pytest.mark.slow
def test_the_resume_line_works_as_printed_in_a_fresh_shell(tmp_path):
    stop = ["+callbacks.stop._target_=tests.test_interrupt.SendSignal", "+callbacks.stop.step=3",
            "+callbacks.stop.signum=2"]  # fmt: skip
    done = run_cli("train.py", "trainer.max_steps=12", *SHRINK, "sample.length=0", *stop, cwd=tmp_path)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]  # after the "finishing this batch" note
    saved, command = re.fullmatch(
        r"interrupted: SIGINT at epoch \d+, step 3: saved (\S+); resume with: (.+)", line
    ).groups()
    # a fresh shell: no environment active, nothing on PATH but the system's
    fresh = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    resumed = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=fresh, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    ok(resumed)
    assert shlex.split(command)[-1] == f"ckpt_path={saved}"
    assert torch.load(saved, weights_only=True, map_location="cpu")["global_step"] == 12
    assert "step 12" in resumed.stdout


def test_the_console_filter_keeps_device_lines_and_other_processes_info_lines_off(monkeypatch):
    from charlstm.app.logs import ConsoleLines

    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    console = ConsoleLines()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    # Lightning's CUDA line (on a GPU: one per process) is device inventory, in train.log only
    assert not console.filter(record("pytorch_lightning.accelerators.cuda", logging.INFO, "LOCAL_RANK: 0 - CUDA_VI"))
    assert console.filter(record("charlstm.app.train", logging.INFO, "training: recipe default"))
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of a DDP run: its start lines would repeat rank 0's
    assert not console.filter(record("charlstm.app.train", logging.INFO, "training: recipe default"))
    assert console.filter(record("charlstm.app.train", logging.WARNING, "something real"))


@pytest.mark.parametrize(("limits", "text"), [({"max_steps": 5}, "Epoch 3"), ({"max_epochs": 4}, "Epoch 3/3")])
def test_the_bars_epoch_text_has_no_limit_when_the_run_has_none(limits, text):
    """RichBar fills in Lightning's protected hook for the bar's epoch text: it must still be the one the bar uses."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import RichProgressBar

    from charlstm.training.progress import RichBar

    assert callable(vars(RichProgressBar).get("_get_train_description"))
    bar = RichBar()
    bar.setup(pl.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, **limits), None, "fit")
    assert bar._get_train_description(3).strip() == text
