"""The command line of train.py, generate.py and eval.py: every command composes its config with Hydra, free text and
paths are taken literally, and Hydra's errors become one line built from the fields of its exception types."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

from charlstm.app.cli import defaults_list_owner, hydra_error_line, literal_args
from tests.cli import one_line_error, run_cli
from tests.conftest import CONFIG_DIR, compose_cfg

# free text and paths, each as typed: Hydra is given them quoted, and reads them back unchanged
TYPED = [
    ("prompt", "what's this, macbeth?"),
    ("prompt", "${x} \\${y} \\ 'q' \"d\" [a, b] ="),
    ("prompt", ""),
    ("prompt", "the 你好\nsecond line"),
    ("prompt", "~x"),
    ("prompt", "a\\"),
    ("ckpt", "~/runs/last.ckpt"),
    ("prompt_file", "~/opening.txt"),
    ("output", "~/samples.txt"),
    ("ckpt", "outputs/2024-01-01/12-00-00/checkpoints/last.ckpt"),
]


@pytest.mark.parametrize(("key", "text"), TYPED)
def test_free_text_and_paths_read_back_as_typed(key, text):
    assert compose_cfg("generate", literal_args([f"{key}={text}"]))[key] == text


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
    assert compose_cfg("generate", literal_args([f"ckpt={job}", "length=3"])).ckpt == str(job)
    # an existing path Hydra reads as itself is passed as typed (the overrides name run folders and command lines)
    assert literal_args([f"ckpt={job.parent.parent}"]) == [f"ckpt={job.parent.parent}"]


def test_generate_composes_its_config_with_hydra(tmp_path):
    code = (
        "import json, sys\n"
        "from charlstm.app.cli import hydra_entry\n"
        f"hydra_entry({str(CONFIG_DIR)!r}, 'generate', 'builtins:print')\n"  # the task prints the config
        "print(json.dumps('hydra' in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "length=7", "prompt=a, b"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    *config, hydra = done.stdout.strip().splitlines()
    assert json.loads(hydra) is True
    assert "'length': 7" in config[0] and "'prompt': 'a, b'" in config[0]


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
        f"hydra_entry({str(CONFIG_DIR)!r}, 'generate', 'task:run')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    if args == ["lenght=7"]:  # a failed command: its error line, and the same freeze at exit
        assert done.returncode == 1 and done.stderr.startswith("error: "), done.stderr[-2000:]
        assert done.stdout.splitlines() == ["frozen at exit: True"]
        return
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["frozen in the command: False", "frozen at exit: True"]


# -- Hydra's errors as one line -----------------------------------------------------------------------------------
def error_of(config_name: str, args: list[str], exception: type[Exception] = ConfigCompositionException) -> str:
    """The line for the error Hydra raises composing ``config_name`` with ``args``."""
    with pytest.raises(exception) as info:
        compose_cfg(config_name, args)
    return hydra_error_line(info.value, CONFIG_DIR, config_name, args)


@pytest.mark.parametrize(
    ("config_name", "args", "line"),
    [
        ("generate", ["temprature=0.5"], "temprature is not a setting: did you mean temperature?"),
        ("eval", ["batchsize=8"], "batchsize is not a setting: did you mean batch_size?"),
        ("eval", ["data.pth=x"], "data.pth is not a setting: did you mean data.path?"),
        ("train", ["model.unitz=3"], "model.unitz is not a setting: did you mean model.units?"),
        ("train", ["modle.units=3"], "modle is not a setting: did you mean model?"),  # the first missing level
        ("generate", ["zzz=1"], "zzz is not a setting: settings there: ckpt, outputs_root, prompt, prompt_file,"),
    ],
)
def test_a_misspelt_key_names_the_closest_keys_of_the_config(config_name, args, line):
    key = line.split(" ")[0]
    shown = error_of(config_name, args)
    assert shown.startswith(line), shown
    assert shown.endswith(f"(to add a new key on purpose: +{key}=VALUE)")


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/submitit_\w+' is validated")  # as the commands do
def test_a_value_of_the_wrong_type_for_a_typed_config_names_the_key_and_the_value():
    with (
        pytest.raises(ConfigCompositionException) as info,
        initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)),
    ):
        compose("train", ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=abc"], return_hydra_config=True)
    line = hydra_error_line(info.value, CONFIG_DIR, "train", [])
    assert line.startswith("hydra.launcher.timeout_min='abc' is not allowed: ") and "Integer" in line


def test_an_unknown_choice_names_the_choices():
    assert error_of("eval", ["data=fil"], MissingConfigException) == (
        "data=fil is not a known choice; did you mean file? choices: file, macbeth, macbeth_plays, "
        "shakespeare (files in configs/data/)"
    )
    assert error_of("train", ["experiment=plais"], MissingConfigException).startswith(
        "experiment=plais is not a known choice; did you mean plays? choices: charrnn, default, finetune, plays, seed"
    )


def test_a_choice_named_by_a_config_files_defaults_list_names_that_file(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - plais\n")
    args = [f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine"]
    with pytest.raises(MissingConfigException) as info:
        compose_cfg("train", args)
    # Hydra names the file in its message only: this fails if it words it otherwise
    assert defaults_list_owner(info.value) == "experiment/mine"
    assert hydra_error_line(info.value, CONFIG_DIR, "train", args).startswith(
        f"{tmp_path / 'experiment' / 'mine.yaml'}: its defaults list names plais, which is not a config in "
        "experiment/; did you mean plays? choices: charrnn, default, finetune, mine, plays, seed"
    )


@pytest.mark.parametrize("bad", ["length=1)", "a b=2", "prompt_file=x]"])
def test_an_unreadable_override_is_named_with_what_hydras_grammar_says(bad):
    with (
        initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)),
        pytest.raises(OverrideParseException) as info,
    ):
        compose("generate", ["length=1", bad])
    line = hydra_error_line(info.value, CONFIG_DIR, "generate", ["length=1", bad])
    assert line.startswith(f"cannot read the override {bad!r} (") and "\n" not in line
    assert line.endswith("); quote a value that holds spaces, commas, brackets or quotes, e.g. key='a, b'")
    assert "Error parsing override" not in line and "See https" not in line


@pytest.mark.parametrize(
    ("args", "line"),
    [
        # Hydra refuses these with a bare ValueError: this fails if it words them otherwise
        (["-m", "--cfg", "job", "seed=1,2"], "error: --cfg prints the config of one run, and Hydra does not combine "
                                             "it with -m: drop -m and give each swept key one value, e.g. seed=1 ("),
        (["--cfg", "job", "--run"], "error: --cfg and --run cannot be used together: Hydra takes one of"),
        (["--resolve"], "error: --resolve applies to --cfg (or --help): add --cfg job to print the resolved config"),
    ],
)  # fmt: skip
def test_hydras_refusal_of_two_modes_is_one_line(tmp_path, args, line):
    assert one_line_error(run_cli("generate.py", *args, cwd=tmp_path)).startswith(line)


@pytest.mark.parametrize("script", ["generate.py", "eval.py"])
def test_each_command_says_a_misspelt_key_and_an_unreadable_override_in_one_line(tmp_path, script):
    line = one_line_error(run_cli(script, "devcie=cpu", cwd=tmp_path))
    assert line.startswith("error: devcie is not a setting: did you mean device?")
    line = one_line_error(run_cli(script, "device=cpu)", cwd=tmp_path))
    assert line.startswith("error: cannot read the override 'device=cpu)' (")
