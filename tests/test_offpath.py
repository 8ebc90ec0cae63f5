"""One step off the demo path, as a new user takes it: their own text, a short run, no progress bar, a resume
by the line an interrupted run prints, prompts with quotes and other scripts, typos. Each works, or fails in
one line."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from charlstm.app.cli import command_line
from tests.cli import ROOT, SHRINK, cli_env, ok, on_a_terminal, one_line_error, run_cli, run_folders

pytestmark = pytest.mark.slow

ASM = "\n".join(
    f"{op} {reg}, 0x{i * 7 % 256:02x}; add {reg}, [ebp-{i % 16}]"
    for i, (op, reg) in enumerate(zip(["mov", "xor", "sub", "cmp", "lea"] * 60, ["eax", "ebx", "ecx", "edx"] * 75,
                                      strict=True))
)  # fmt: skip
NOISE = ("💡 Tip", "LeafSpec", "has `__len__` defined", "TF32 acceleration", "is not supported by the model summary",
         "is smaller than the logging interval")  # fmt: skip


@pytest.fixture(scope="module")
def asm_run(tmp_path_factory) -> dict:
    """The default recipe on a file of assembler lines, 20 steps."""
    cwd = tmp_path_factory.mktemp("asm")
    (cwd / "my.asm.txt").write_text(ASM + "\n", encoding="utf-8")
    # a cold start (fresh=True), as a user's first command: its console is checked for library chatter
    done = run_cli("train.py", "data=file", "data.path=my.asm.txt", "trainer.max_steps=20", *SHRINK,
                   "data.max_chars=null", cwd=cwd, fresh=True)  # fmt: skip
    return {"cwd": cwd, "done": done, "runs": run_folders(cwd / "outputs")}


def test_own_file_trains_on_that_file_alone(asm_run):
    ok(asm_run["done"])
    (run,) = asm_run["runs"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert sorted(ckpt["hyper_parameters"]["vocab"]) == sorted(set((ASM + "\n").lower()))
    assert ckpt["global_step"] == 20


def test_default_run_console_has_no_library_chatter(asm_run):
    done = ok(asm_run["done"])
    for line in NOISE:
        assert line not in done.stdout and line not in done.stderr, line
    assert "val/bpc:" in done.stdout and "run folder:" in done.stdout
    # piped, as here: no bar redraws in the output, one line per validation instead
    assert "Epoch 0" not in done.stdout
    assert re.search(r"^validation at step \d+ \(epoch \d+\): val/bpc \d", done.stdout, re.M)


def test_generate_takes_a_prompt_with_commas_semicolons_and_equals_literally(asm_run):
    (run,) = asm_run["runs"]
    ckpt = run / "checkpoints" / "last.ckpt"
    done = ok(run_cli("generate.py", f"ckpt={ckpt}", "prompt=mov eax, 0x1f; add", "length=10", cwd=asm_run["cwd"]))
    assert done.stdout.startswith("mov eax, 0x1f; add")
    assert len(done.stdout.rstrip("\n")) >= len("mov eax, 0x1f; add") + 5


def test_generate_prompt_outside_the_vocabulary_is_one_line(asm_run):
    (run,) = asm_run["runs"]
    done = run_cli("generate.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "prompt=the 你好", "length=5",
                   cwd=asm_run["cwd"])  # fmt: skip
    line = one_line_error(done)
    assert "'你'" in line and "'好'" in line


def test_a_checkpoint_in_a_sweep_job_folder_is_taken_as_the_path_it_is(asm_run, tmp_path):
    # sweep job folders are named by their values ('=' and ','): the path a summary shows must work as ckpt=PATH
    (run,) = asm_run["runs"]
    job = tmp_path / "sweep" / "1_model.units=8,data.seq_len=20" / "checkpoints"
    job.mkdir(parents=True)
    ckpt = job / "last.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", ckpt)
    done = ok(run_cli("generate.py", f"ckpt={ckpt}", "prompt=mov", "length=5", cwd=asm_run["cwd"]))
    assert done.stdout.startswith("mov")
    done = ok(run_cli("eval.py", f"ckpt={ckpt}", "data=file", f"data.path={asm_run['cwd'] / 'my.asm.txt'}",
                      "data.max_chars=2000", cwd=asm_run["cwd"]))  # fmt: skip
    assert done.stdout.startswith("bits/char ")
    # a value that is not an existing file is still Hydra's to read: a sweep over two files, or an unreadable one
    line = one_line_error(run_cli("generate.py", f"ckpt={job}=x/last.ckpt", cwd=asm_run["cwd"]))
    assert "ckpt=" in line


def test_generate_says_which_checkpoint_last_picked(asm_run):
    done = ok(run_cli("generate.py", "ckpt=last", "length=5", cwd=asm_run["cwd"]))
    (run,) = asm_run["runs"]
    assert f"checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in done.stderr


def test_run_that_ends_before_its_first_validation_validates_once(tmp_path):
    done = ok(run_cli("train.py", "experiment=charrnn", "trainer.max_steps=30", *SHRINK, cwd=tmp_path))
    (run,) = run_folders(tmp_path / "outputs")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    assert re.search(r"val/bpc:\s+\d+\.\d+ \(final\)", done.stdout)


def test_no_progress_bar_run_logs_to_train_log(tmp_path):
    done = ok(run_cli("train.py", "trainer.enable_progress_bar=false", "trainer.max_steps=20", *SHRINK, cwd=tmp_path))
    (run,) = run_folders(tmp_path / "outputs")
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "training: recipe default" in log
    assert re.search(r"validation at step 20 \(epoch 0\): val/bpc \d", log)
    assert "val/bpc:" in log and "run folder:" in log
    assert "validation at step 20" in done.stdout  # no live bar: the numbers are on the console too


def test_a_terminal_gets_the_live_bar(tmp_path):
    # on a terminal: the bar, with `Epoch 0` (no epoch limit), not `Epoch 0/-2` (a pipe: the chatter test above)
    (tmp_path / "tty").mkdir()
    command = [sys.executable, str(ROOT / "train.py"), "trainer.max_steps=20", *SHRINK]
    status, shown = on_a_terminal(command, tmp_path / "tty", cli_env(COLUMNS="120"))
    assert status == 0
    assert "Epoch 0" in shown and "0/-2" not in shown
    assert "validation at step 20" not in shown  # the bar carries the numbers; the line is in train.log


def test_debug_fast_runs_on_the_default_recipe(tmp_path):
    ok(run_cli("train.py", "debug=fast", *SHRINK, cwd=tmp_path))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["experiment=fast"], "error: experiment=fast is not a known choice; choices: charrnn, default,"),
        (["model.unit=64"], "error: model.unit is not a setting: did you mean model.units?"),
        (["data.seq_len=0"], "error: data.seq_len=0 is not allowed: it must be an integer >= 1"),
        (
            ["-m", "model.units=8,16", "--cfg", "job"],
            "error: --cfg prints the config of one run, and Hydra does not "
            "combine it with -m: drop -m and give each swept key one value, e.g. model.units=8 (",
        ),
    ],
)
def test_mistakes_are_one_line_and_leave_no_run_folder(tmp_path, args, expected):
    line = one_line_error(run_cli("train.py", *args, cwd=tmp_path))
    assert line.startswith(expected)
    assert not (tmp_path / "outputs").exists() or not run_folders(tmp_path / "outputs")
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_dir() and not any(p.iterdir())]


def test_resume_by_the_printed_line_restores_the_run(tmp_path):
    first = ["experiment=seed", "data.max_chars=30000", "model.units=32", "trainer.max_steps=20", "sample.length=0"]
    ok(run_cli("train.py", *first, cwd=tmp_path))
    (run,) = run_folders(tmp_path / "outputs")
    last = run / "checkpoints" / "last.ckpt"
    done = ok(run_cli("train.py", f"ckpt_path={last}", "trainer.max_steps=40", "sample.length=0", cwd=tmp_path))
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 40 and ckpt["hyper_parameters"]["units"] == 32
    assert "step 40" in done.stdout
    assert (run / "config-resume-1.yaml").is_file()
    # an override that would change the data of the run is refused in one line
    line = one_line_error(run_cli("train.py", f"ckpt_path={last}", "data.seq_len=100", cwd=tmp_path))
    assert line.startswith("error: data.seq_len=100 would change data.seq_len of the run being resumed from 50 to 100")
    line = one_line_error(run_cli("train.py", "ckpt_path=last", "model.units=64", cwd=tmp_path))
    assert "model.units=64 would change model.units of the run being resumed from 32 to 64" in line


def test_resume_hint_names_train_py_key(tmp_path):
    line = one_line_error(run_cli("train.py", "ckpt_path=last", cwd=tmp_path))
    assert "ckpt_path=PATH" in line and " ckpt=" not in line


def test_logger_csv_prints_no_tensorboard_hint(tmp_path):
    done = ok(run_cli("train.py", "logger=csv", "trainer.max_steps=5", *SHRINK, cwd=tmp_path))
    assert "tensorboard" not in done.stdout.lower()


def test_sample_prompt_with_quotes_and_accents(tmp_path):
    text = tmp_path / "fr.txt"
    text.write_text("l'été où «macbeth» dîna, à l'aube: 'ça va?' dit-il.\n" * 120, encoding="utf-8")
    done = ok(run_cli("train.py", "data=file", f"data.path={text}", "trainer.max_steps=5", *SHRINK,
                      "sample.prompt=«ça va?» dit-il, 'à l'été'", cwd=tmp_path))  # fmt: skip
    assert "«ça va?» dit-il, 'à l'été'" in done.stdout
    line = one_line_error(run_cli("train.py", "data=file", f"data.path={text}", "trainer.max_steps=5", *SHRINK,
                                  "callbacks.text_sample.prompt=жук", cwd=tmp_path))  # fmt: skip
    assert line.startswith("error: callbacks.text_sample.prompt='жук' has") and "'ж'" in line
    assert "unknown=skip" not in line


def test_unexpected_exception_leaves_last_checkpoint_and_one_line(make_cfg, monkeypatch):
    from charlstm.app.train import train
    from charlstm.core.errors import TrainingFailed
    from charlstm.training.model import CharLSTMModule

    step = CharLSTMModule.training_step

    def failing(self, batch, batch_idx):
        if self.global_step == 7:
            raise RuntimeError("disk on fire")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(CharLSTMModule, "training_step", failing)
    cfg = make_cfg("trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=null")
    with pytest.raises(TrainingFailed) as info:
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert str(info.value).startswith("training stopped at step 7 by RuntimeError: disk on fire; the last good state")
    assert f"resume with: {command_line('train.py', f'ckpt_path={last}')}" in str(info.value)
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 7
