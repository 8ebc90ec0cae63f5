"""generate.py reads a plain command line without Hydra: the config must be exactly the one Hydra composes (values
and their types), and anything Hydra would read differently must be left to Hydra."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from charlstm.app.cli import literal_args, plain_config
from tests.conftest import CONFIG_DIR, compose_cfg

SAME_AS_HYDRA = [
    [],
    ["ckpt=last"],
    ["ckpt=/tmp/runs/last.ckpt", "length=1"],
    ["ckpt=outputs/2024-01-01/12-00-00/checkpoints/last.ckpt"],
    ["temperature=0", "top_k=+3", "top_p=.9", "length=500"],
    ["temperature=1.", "top_p=9e-1", "seed=NULL", "threads=null"],
    ["seed=true", "num_samples=-1", "length=abc", "mode=window", "device=auto", "unknown=skip"],
    ["output=samples.txt", "prompt_file=opening.txt", "outputs_root=runs/a_b@c"],
    ["prompt=what's this, macbeth?", "length=20"],
    ["prompt=${x} \\${y} \\ 'q' \"d\" [a, b] =", "temperature=0.8"],
    ["prompt=", "mode=stateful"],
    ["prompt=the 你好\nsecond line"],
    # a path typed with `~` (the shell leaves it as is after `=`): taken literally, expanded where it is read
    ["ckpt=~/runs/last.ckpt", "prompt_file=~/opening.txt", "output=~/samples.txt"],
]


@pytest.mark.parametrize("args", SAME_AS_HYDRA)
def test_plain_config_is_the_one_hydra_composes(args):
    mine = plain_config(CONFIG_DIR, "generate", args)
    assert mine is not None
    hydras = compose_cfg("generate", literal_args(args))
    theirs = {k: v for k, v in OmegaConf.to_container(hydras).items() if k != "hydra"}
    ours = OmegaConf.to_container(mine)
    assert ours == theirs
    assert {k: mine[k] for k in mine} == {k: hydras[k] for k in mine}  # as the program reads them (escapes undone)
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in theirs.items()}
    assert OmegaConf.is_struct(mine)  # a mistyped key in code fails as under Hydra


def test_a_path_starting_with_tilde_is_taken_literally():
    # Hydra's grammar has no unquoted `~` in a value: unquoted, these were one-line errors
    args = ["data.path=~/my.txt", "ckpt_path=~/runs/last.ckpt", "ckpt=~user/x=1,2.ckpt", "output=~/o.txt"]
    assert literal_args(args) == ["data.path='~/my.txt'", "ckpt_path='~/runs/last.ckpt'", "ckpt='~user/x=1,2.ckpt'",
                                  "output='~/o.txt'"]  # fmt: skip
    cfg = compose_cfg("train", literal_args(["data=file", "data.path=~/my.txt", "ckpt_path=~/runs/last.ckpt"]))
    assert cfg.data.path == "~/my.txt" and cfg.ckpt_path == "~/runs/last.ckpt"
    assert literal_args(["seed=~1", "prompt=~x"]) == ["seed=~1", "prompt='~x'"]  # other keys: as before


def test_an_existing_path_with_hydra_syntax_in_it_is_taken_literally(tmp_path):
    job = tmp_path / "0_model.units=8,data.seq_len=20" / "last.ckpt"
    job.parent.mkdir()
    job.write_bytes(b"")
    assert literal_args([f"ckpt={job}"]) == [f"ckpt='{job}'"]
    assert literal_args([f"data.path={job}", f"ckpt_path={job}"]) == [f"data.path='{job}'", f"ckpt_path='{job}'"]
    assert literal_args(["data.path=a.txt,b.txt", "ckpt=last", f"outputs_root={job}"]) == [
        "data.path=a.txt,b.txt", "ckpt=last", f"outputs_root={job}"]  # fmt: skip
    assert literal_args([f"output={job}", f"prompt_file={job}"]) == [f"output='{job}'", f"prompt_file='{job}'"]
    mine = plain_config(CONFIG_DIR, "generate", [f"ckpt={job}", "length=3"])
    assert mine is not None and mine.ckpt == str(job)
    assert compose_cfg("generate", literal_args([f"ckpt={job}"])).ckpt == str(job)


LEFT_TO_HYDRA = [
    ["--help"],
    ["--cfg", "job"],
    ["-m", "seed=1,2"],
    ["seed=1,2"],
    ["+length=1"],
    ["~seed"],
    ["hydra.verbose=true"],
    ["temprature=0.5"],  # unknown key: Hydra's one-line error with its suggestion
    ["length=1", "length=2"],
    ["length=1_000"],
    ["temperature=inf"],
    ["seed=-nan"],
    ["output=my samples.txt"],
    ["output='samples.txt'"],
    ["ckpt=${oc.env:HOME}/x.ckpt"],
    ["top_p=[0.9]"],
    ["output="],
    ["ckpt=2024-01-01/last.ckpt"],
    ["+prompt=x"],
]


@pytest.mark.parametrize("args", LEFT_TO_HYDRA)
def test_anything_else_is_left_to_hydra(args):
    assert plain_config(CONFIG_DIR, "generate", args) is None


def test_a_config_that_composes_more_than_itself_is_left_to_hydra():
    assert plain_config(CONFIG_DIR, "train", ["seed=1"]) is None


def test_generate_command_reads_the_plain_line_without_hydra(tmp_path):
    """The entry point itself: a plain line never imports Hydra; a line with a Hydra feature does."""
    code = (
        "import json, sys\n"
        "from charlstm.app.cli import hydra_entry\n"
        f"hydra_entry({str(CONFIG_DIR)!r}, 'generate', 'builtins:print', plain=True)\n"  # the task prints the config
        "print(json.dumps('hydra' in sys.modules))\n"
    )

    def run(*args: str) -> tuple[str, bool]:
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        *config, hydra = done.stdout.strip().splitlines()
        return "\n".join(config), json.loads(hydra)

    plain, hydra = run("length=7", "prompt=a, b"), run("length=7", "prompt=a, b", "hydra.verbose=false")
    assert plain[1] is False and hydra[1] is True
    assert "'length': 7" in plain[0] and plain[0] == hydra[0]


@pytest.mark.parametrize("args", [["length=7"], ["length=7", "hydra.verbose=false"], ["lenght=7"]])
def test_a_command_freezes_its_objects_out_of_the_final_collection_after_every_exit_handler(tmp_path, args):
    """Python's teardown would collect garbage over every object torch and Lightning made (0.8 s after a training
    run); the entry point freezes them first, once every other exit handler has run (logs are flushed by then), and
    whether the command succeeded or failed."""
    (tmp_path / "task.py").write_text(
        "import atexit, gc\n"
        "def run(cfg):\n"  # a command's own exit handler (logging's, Lightning's): registered while it runs
        "    atexit.register(lambda: print('frozen in the command:', gc.get_freeze_count() > 0, flush=True))\n"
    )
    code = (
        "import atexit, gc\n"
        # registered before the entry point: runs after its handler (exit handlers run last-in, first-out)
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0, flush=True))\n"
        "from charlstm.app.cli import hydra_entry\n"
        f"hydra_entry({str(CONFIG_DIR)!r}, 'generate', 'task:run', plain=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    if args == ["lenght=7"]:  # a failed command: its error line, and the same freeze at exit
        assert done.returncode == 1 and done.stderr.startswith("error: "), done.stderr[-2000:]
        assert done.stdout.splitlines() == ["frozen at exit: True"]
        return
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["frozen in the command: False", "frozen at exit: True"]
