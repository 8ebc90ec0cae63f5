"""Mistakes in a recipe file and a search started without -m: each is one line naming the thing and the fix, before
any training (as a mistyped key on the command line is)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from charlstm.app.config import TOP_LEVEL_KEYS, check_top_level
from charlstm.core.errors import ConfigError
from tests import forkserver
from tests.cli import cli_env, one_line_error
from tests.conftest import CONFIG_DIR, ROOT

RECIPES = {
    # a recipe with `model:` misspelt
    "key": ("mine", "# @package _global_\ndefaults:\n  - plays\nmodle:\n  dropout: 0.1\n"),
    "defaults": ("mine", "# @package _global_\ndefaults:\n  - plais\nmodel:\n  dropout: 0.1\n"),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Each command run side by side (each is mostly start-up), with its own recipe folder on Hydra's search path."""
    tmp = tmp_path_factory.mktemp("recipes")
    commands = {}
    for name, (recipe, text) in RECIPES.items():
        (tmp / name / "experiment").mkdir(parents=True)
        (tmp / name / "experiment" / f"{recipe}.yaml").write_text(text)
        commands[name] = [f"hydra.searchpath=[file://{tmp / name}]", f"experiment={recipe}"]
    commands["search"] = ["hparams_search=lstm", "trainer.max_steps=5"]
    procs = {
        name: forkserver.popen([sys.executable, str(ROOT / "train.py"), *args, f"paths.outputs_root={tmp / 'out'}"],
                               ROOT, cli_env())
        for name, args in commands.items()
    }  # fmt: skip
    done = {name: subprocess.CompletedProcess(p.args, p.wait(240), *p.communicate()) for name, p in procs.items()}
    done["tmp"] = tmp
    return done


@pytest.mark.slow
def test_a_misspelt_top_level_key_in_a_recipe_is_refused_naming_the_closest_key(refused):
    line = one_line_error(refused["key"])
    recipe = refused["tmp"] / "key" / "experiment" / "mine.yaml"
    assert line == (f"error: modle is not a setting: did you mean model? (set in {recipe}; to add a new key on "
                    "purpose: +modle=VALUE)")  # fmt: skip
    assert not list((refused["tmp"] / "out").rglob("config.yaml"))  # nothing trained, no run folder left


@pytest.mark.slow
def test_a_typo_in_a_recipes_defaults_list_names_the_recipe_and_the_closest_choice(refused):
    line = one_line_error(refused["defaults"])
    recipe = refused["tmp"] / "defaults" / "experiment" / "mine.yaml"
    assert line.startswith(f"error: {recipe}: its defaults list names plais, which is not a config in experiment/; "
                           "did you mean plays? choices: charrnn, default, finetune, mine, plays, seed")  # fmt: skip


@pytest.mark.slow
def test_a_search_without_multirun_says_it_needs_m(refused):
    line = one_line_error(refused["search"])
    head, again = line.split(": ", 2)[1:]
    assert head == "hparams_search=lstm is a search, which runs with -m (without it this would train one plain run)"
    # the line works as printed: this interpreter, the script, -m and the command's own overrides
    assert again.split()[1:] == ["train.py", "-m", "hparams_search=lstm", "trainer.max_steps=5",
                                 f"paths.outputs_root={refused['tmp'] / 'out'}"]  # fmt: skip
    assert Path(again.split()[0]).resolve() == Path(sys.executable).resolve()
    assert not list((refused["tmp"] / "out").rglob("config.yaml"))


def test_top_level_keys_allow_what_the_configs_compose_and_what_the_command_line_adds():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        for overrides in ([], ["hparams_search=lstm"], ["experiment=seed"], ["debug=fast"], ["data=file"]):
            cfg = compose("train", overrides)
            assert set(cfg) <= set(TOP_LEVEL_KEYS), overrides
            check_top_level(cfg, overrides)
        cfg = compose("train", ["+sampel.length=3"])
    check_top_level(cfg, ["+sampel.length=3"])  # added on purpose
    with pytest.raises(ConfigError, match=r"^sampel is not a setting: did you mean sample\? \(set in a config file;"):
        check_top_level(cfg, [])
