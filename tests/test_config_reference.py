"""docs/configuration.md, the reference of every configuration key: written from configs/ and the rule tables by
docs/make_config_reference.py (`make docs`), and checked here against both, with the configs composed by Hydra."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, ROOT

GENERATOR = ROOT / "docs" / "make_config_reference.py"


def load_generator() -> ModuleType:
    """docs/make_config_reference.py, a script outside the package."""
    spec = importlib.util.spec_from_file_location("make_config_reference", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ref = load_generator()


# --- the page as a reader sees it


def cells(line: str) -> list[str]:
    """A Markdown table row's cells, with `\\|` read back as `|`."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(section heading, header, rows) of every table of the page."""
    found: list[tuple[str, list[str], list[list[str]]]] = []
    heading, lines = "", text.splitlines()
    for n, line in enumerate(lines):
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("| ") and n + 1 < len(lines) and lines[n + 1].startswith("|---"):
            found.append((heading, cells(line), []))
        elif line.startswith("| ") and found and lines[n - 1].strip() != "":
            found[-1][2].append(cells(line))
    return found


def command_of(heading: str) -> str:
    """The entry config a section belongs to: generate.py's and eval.py's own sections, else train.py's."""
    return next((name for name in ("generate", "eval") if heading.startswith(f"{name}.py")), "train")


class KeyRow(NamedTuple):
    heading: str
    command: str
    key: str
    default: str
    allowed: str
    meaning: str


def key_rows(text: str) -> list[KeyRow]:
    """Every row of the key tables, with its section."""
    out = []
    for heading, header, rows in tables(text):
        if header == ["key", "default", "allowed", "meaning"]:
            out += [KeyRow(heading, command_of(heading), r[0].strip("`"), *r[1:]) for r in rows]
    return out


def section_options(text: str) -> dict[str, list[str]]:
    """The options each section's options table names, as overrides (`data=file`, `hydra/job_logging=charlstm`)."""
    out = {}
    for heading, header, rows in tables(text):
        if header[0] == "option":
            spans = [code_spans(row[0])[0] for row in rows]
            out[heading] = [s if "=" in s else f"{heading.split()[0]}={s}" for s in spans]
    return out


def shown_values(cell: str) -> tuple[str | None, dict[str, str]]:
    """A default cell read back: `VALUE` or — (not set by the default option), then `g=o`, `g=p`: `VALUE`; ..."""
    first = re.match(r"—|`[^`]*`", cell)
    assert first, cell
    others = re.findall(r"; ((?:`[^`]*`, )*`[^`]*`): `([^`]*)`", cell[first.end() :])
    listed = {option: value for options, value in others for option in code_spans(options)}
    return (None if first.group() == "—" else code_spans(first.group())[0]), listed


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]*)`", text)


@pytest.fixture(scope="module")
def page() -> str:
    return ref.PAGE.read_text(encoding="utf-8")


# --- the configs as Hydra composes them


@cache
def composed(command: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config a command line composes (with Hydra's own settings), interpolations left as written."""
    with warnings.catch_warnings():  # the submitit launchers' schema matching is announced as deprecated
        warnings.simplefilter("ignore", UserWarning)
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose(config_name=command, overrides=list(overrides), return_hydra_config=True)
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    return container


def leaves(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys a user sets: values, not the mappings holding them (a leaf mapping is one value)."""
    out = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key == "_target_":
            continue
        if isinstance(value, dict) and value and dotted not in ref.LEAF_MAPPINGS:
            out += leaves(value, dotted + ".")
        else:
            out.append(dotted)
    return out


# --- 1. up to date


def test_the_page_is_what_the_generator_writes(page):
    try:
        written = ref.render()
    except ref.Undocumented as err:
        pytest.fail(f"make docs cannot write docs/configuration.md:\n{err}")
    diff = "".join(list(difflib.unified_diff(page.splitlines(True), written.splitlines(True), "committed", "now"))[:40])
    assert page == written, f"docs/configuration.md is out of date: run `make docs`\n{diff}"


# --- 2. every key has a meaning


def test_every_key_and_option_has_a_comment():
    missing = ref.problems()
    assert not missing, "keys without a comment in their YAML file:\n" + "\n".join(missing)


def file_keys(path: Path) -> list[str]:
    """The keys of one YAML file under configs/, dotted from the top as a user types them."""
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    data.pop("defaults", None)
    group = path.parent.relative_to(CONFIG_DIR).as_posix()
    if path.parent == CONFIG_DIR:
        prefix = ""
        for skipped in ref.ENTRY_SKIP.get(path.stem, ()):
            data.pop(skipped, None)
    else:
        prefix = "" if "# @package _global_" in text else group.replace("/", ".") + "."
    return leaves(data, prefix)


def yaml_files() -> list[Path]:
    logging = tuple(CONFIG_DIR / g for g in ref.LOGGING_GROUPS)
    return [p for p in sorted(CONFIG_DIR.rglob("*.yaml")) if p.parent not in logging]


def test_every_key_of_every_yaml_file_is_on_the_page_with_a_meaning(page):
    meanings: dict[str, list[str]] = {}
    for row in key_rows(page):
        meanings.setdefault(row.key, []).append(row.meaning)
    missing = [
        f"{path.relative_to(ROOT)}: {key}"
        for path in yaml_files()
        for key in file_keys(path)
        if not all(meanings.get(key, [""]))
    ]
    assert len(yaml_files()) >= 30
    assert not missing, "keys not on docs/configuration.md with a meaning (add a comment, run `make docs`):\n" + (
        "\n".join(missing)
    )


@pytest.mark.parametrize("command", ["train", "generate", "eval"])
def test_every_key_a_command_composes_is_on_the_page(page, command):
    on_page = {r.key for r in key_rows(page) if r.command == command or (command == "eval" and r.command == "train")}
    config = composed(command)
    config.pop("hydra")  # Hydra's own settings: the page has those train.py's configs set
    missing = [key for key in leaves(config) if key not in on_page]
    assert not missing, f"{command}.py composes keys that docs/configuration.md lacks: {missing}"


# --- 3. the rules and the configs behind every row


def test_every_rule_is_on_the_page_with_its_allowed_values(page):
    allowed: dict[str, dict[str, str]] = {}
    for row in key_rows(page):
        allowed.setdefault(row.command, {})[row.key] = row.allowed
    wrong = []
    for command, rules in ref.rule_tables():
        for key, rule in rules.items():
            # eval.py takes its data=... text from the data group, whose keys are train.py's
            shown = allowed[command].get(key, allowed["train"].get(key) if command == "eval" else None)
            expected = ref.machine_free(rule[2])
            if shown != expected:
                wrong.append(f"{command}.py {key}: the page says {shown!r}, the rule {expected!r}")
    assert len(wrong) == 0, "rules the page does not show (run `make docs`):\n" + "\n".join(wrong)


def test_every_key_on_the_page_is_in_the_configs_with_the_value_shown(page):
    """Each row against the config Hydra composes for the command, and for each option of its section: the option
    the row names gives the value shown, any other leaves the key out or gives the default shown. (Hydra and its
    launcher plugins give their own defaults to the hydra.* keys the configs leave unset, shown as —.)"""
    options = section_options(page)
    rows = key_rows(page)
    assert len(rows) > 150
    stale = []
    for row in rows:
        default, listed = shown_values(row.default)
        if default is None and not listed and row.key not in ref.UNSET:
            stale.append(f"{row.command}.py: {row.key}: the page names no value and no option that sets it")
        for override in dict.fromkeys(["", *options.get(row.heading, []), *listed]):
            present, value = ref.lookup(composed(row.command, (override,) if override else ()), row.key)
            actual = ref.show(value) if present else None  # None: not in the composed config, as — on the page
            where = f"{row.command}.py {override}".strip()
            if override in listed:
                if actual != listed[override]:
                    stale.append(f"{where}: {row.key} is {actual or 'not set'}, the page says {listed[override]}")
            elif default is None and row.key.startswith("hydra."):
                continue  # Hydra's own default, or its plugin's
            elif (override == "" or present) and actual != default:
                stale.append(f"{where}: {row.key} is {actual or 'not set'}, the page says {default or '—'}")
    assert not stale, "rows that differ from the composed configs (run `make docs`):\n" + "\n".join(stale)


def test_what_each_recipe_preset_and_search_sets_is_what_it_composes_to(page):
    wrong = []
    for heading, header, rows in tables(page):
        if header != ["option", "what it is", "what it sets"]:
            continue
        group = heading.split()[0]
        for option, _, sets in rows:
            option = code_spans(option)[0]
            config = composed("train", (f"{group}={option}",))
            choices = config["hydra"]["runtime"]["choices"]
            for setting in code_spans(sets):
                key, _, shown = setting.partition("=")
                if key in choices:  # another group's option: data=macbeth
                    present, actual = True, str(choices[key])
                else:
                    present, value = ref.lookup(config, key)
                    actual = ref.show(value)
                if not present or actual != shown:
                    wrong.append(f"{group}={option}: the page says {setting}, it composes to {actual!r}")
    assert not wrong, "\n".join(wrong)
