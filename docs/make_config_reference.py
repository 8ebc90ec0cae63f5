"""Writes docs/configuration.md, the reference of every configuration key (`make docs`).

Keys, defaults and meanings come from configs/: every key's meaning is its comment in its YAML file (on its line, the
aligned comment lines under it, or the comment lines right above it), and a group option's values are its YAML file
merged over the options it lists in its own defaults, as Hydra merges them. The allowed values are the rule tables the
commands check every value against before any work (charlstm.app.config.TRAIN_RULES, charlstm.app.generate.
GENERATE_RULES, charlstm.app.evaluate.EVAL_RULES). A key without a comment stops the script with one line per key,
naming its file. tests/test_config_reference.py checks the page against the configs and the rule tables.

    python docs/make_config_reference.py           # rewrites docs/configuration.md
    python docs/make_config_reference.py --check   # exit 1 when the page is not what it would write
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from charlstm.app.config import TRAIN_RULES, Rule
from charlstm.app.evaluate import EVAL_RULES
from charlstm.app.generate import GENERATE_RULES
from charlstm.core.hardware import usable_cores

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAGE = ROOT / "docs" / "configuration.md"
TRAINER_DOCS = "https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-class-api"

# the groups of train.py, in the page's order: those that hold settings under their own name, then those that set
# keys anywhere (@package _global_: recipes, quick checks, the search), then Hydra's own
GROUPS = ("data", "model", "trainer", "callbacks", "logger", "paths")
GLOBAL_GROUPS = ("experiment", "debug", "hparams_search")
HYDRA_GROUPS = ("hydra", "hydra/launcher")
# Python logging configurations (handlers, formatters): named on the page by what they do, their keys are not settings
LOGGING_GROUPS = ("hydra/hydra_logging", "hydra/job_logging")
# keys of an entry config that are not settings: Hydra's settings of generate.py and eval.py themselves (no run
# folder, their --help text)
ENTRY_SKIP = {"generate": ("hydra",), "eval": ("hydra",)}
# mappings that are one value (their keys are data, not settings)
LEAF_MAPPINGS = ("callbacks.scalar_layout.charts", "hydra.sweeper.params")
# keys that a rule table checks but no config sets: the user adds them with +KEY=VALUE
UNSET = {
    "trainer.gradient_clip_algorithm": "how gradient_clip_val clips: the gradient norm or each value (Lightning's "
    "default: norm); not set here, add it with +trainer.gradient_clip_algorithm=value",
}


class Undocumented(Exception):
    """Keys, options or groups the page would leave without a meaning, one line each."""


@dataclass
class ConfigFile:
    """One YAML file: its keys in order with their comments, its own values and its defaults list."""

    path: Path
    prefix: str  # where its keys go: "" for an entry config or @package _global_, else "data.", "hydra.launcher." ...
    header: str  # the comment lines at the top: what the option is
    rows: list[str]  # the keys a user sets, dotted from the top ("data.seq_len"), in the file's order
    comments: dict[str, str]
    values: DictConfig  # the file's own values, without its defaults list
    defaults: list[Any]

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))


def read_config(path: Path, prefix: str | None = None) -> ConfigFile:
    """Keys, comments and values of one YAML file. ``prefix`` None: from its group folder and its @package line."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    header_end = next((n for n, line in enumerate(lines) if not line.startswith("#")), len(lines))
    header_lines = [line[1:].strip() for line in lines[:header_end] if not line.startswith("# @package")]
    if prefix is None:
        group = path.parent.relative_to(CONFIGS).as_posix()
        prefix = "" if "# @package _global_" in text else group.replace("/", ".") + "."
    values = OmegaConf.load(path)
    assert isinstance(values, DictConfig), path
    defaults = OmegaConf.to_container(values.pop("defaults", OmegaConf.create([])))
    assert isinstance(defaults, list), path
    found = ConfigFile(path, prefix, " ".join(header_lines), [], {}, values, defaults)
    node = yaml.compose(text)
    if node is not None:
        _walk(node, prefix, lines, header_end, found, top=True)
        tops = [k.value for k, _ in node.value if k.value != "defaults"]
        only = prefix + tops[0] if len(tops) == 1 else None
        if only in found.rows and only not in found.comments and found.header:  # a callback's file describes it
            found.comments[only] = found.header
    return found


def _walk(node: yaml.MappingNode, prefix: str, lines: list[str], header_end: int, out: ConfigFile, top: bool) -> None:
    for key_node, value in node.value:
        key = prefix + str(key_node.value)
        if top and key_node.value == "defaults":
            continue
        if top and out.path.parent == CONFIGS and key_node.value in ENTRY_SKIP.get(out.path.stem, ()):
            continue
        comment = _comment(key_node, value, lines, header_end)
        if comment:
            out.comments[key] = comment
        if key_node.value == "_target_":
            continue
        is_mapping = isinstance(value, yaml.MappingNode) and value.value and key not in LEAF_MAPPINGS
        if not is_mapping or any(k.value == "_target_" for k, _ in value.value):
            out.rows.append(key)  # a value, or an object Hydra instantiates (a callback, a logger)
        if is_mapping:
            _walk(value, key + ".", lines, header_end, out, top=False)


def _comment(key_node: yaml.Node, value: yaml.Node, lines: list[str], header_end: int) -> str:
    """The comment on the key's line (and the lines under it whose # is aligned with it), else the comment lines
    right above the key at its indentation (not the file's header)."""
    row = key_node.start_mark.line
    same_line = value.end_mark.line == row  # a value (or flow collection) on the key's line
    start = value.end_mark.column if same_line else key_node.end_mark.column
    rest = lines[row][start:]
    stripped = rest.lstrip().removeprefix(":").lstrip()
    if stripped.startswith("#"):
        column = len(lines[row]) - len(stripped)
        parts = [stripped[1:].strip()]
        for line in lines[row + 1 :]:
            if not (line.strip().startswith("#") and line.index("#") == column):
                break
            parts.append(line.strip()[1:].strip())
        return " ".join(parts)
    above = []
    indent = key_node.start_mark.column
    for n in range(row - 1, -1, -1):
        line = lines[n]
        if not (line.strip().startswith("#") and line.index("#") == indent):
            break
        above.insert(0, (n, line.strip()[1:].strip()))
    if above and above[0][0] >= header_end:
        return " ".join(text for _, text in above)
    return ""


# --- values


def show(value: Any) -> str:
    """A value as it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    if isinstance(value, dict) and "_target_" in value:  # an object: its class
        return str(value["_target_"])
    if isinstance(value, dict | list):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return str(value)


def lookup(container: Any, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key in a plain container; a leaf mapping's keys may hold dots."""
    node = container
    for leaf in LEAF_MAPPINGS:
        if key.startswith(leaf + "."):
            return False, None
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


# --- groups


@dataclass
class Group:
    name: str  # as typed: data, hydra/launcher
    default: str | None  # the option train.py takes without group=option
    files: dict[str, ConfigFile] = field(default_factory=dict)  # option -> file
    _merged: dict[str, tuple[list[str], dict[str, Any]]] = field(default_factory=dict, repr=False)

    def chain(self, option: str) -> list[ConfigFile]:
        """The option's file and the same group's options its defaults list names, in the order Hydra merges them
        (_self_ last where the list does not place it)."""
        own = self.files[option]
        names = [d for d in own.defaults if isinstance(d, str)]
        if "_self_" not in names:
            names.append("_self_")
        out: list[ConfigFile] = []
        for name in names:
            for f in [own] if name == "_self_" else self.chain(name):
                if f not in out:
                    out.append(f)
        return out

    def merged(self, option: str) -> tuple[list[str], dict[str, Any]]:
        """The option's keys in order and its values (keys dotted from the top)."""
        if option not in self._merged:
            self._merged[option] = self._merge(option)
        return self._merged[option]

    def _merge(self, option: str) -> tuple[list[str], dict[str, Any]]:
        chain = self.chain(option)
        rows = list(dict.fromkeys(k for f in chain for k in f.rows))
        values = OmegaConf.to_container(OmegaConf.merge(*(f.values for f in chain)), resolve=False)
        prefix = chain[-1].prefix
        return rows, {k: lookup(values, k[len(prefix) :]) for k in rows}

    def overrides(self, option: str) -> list[str]:
        """The other groups an option picks (`override /data: macbeth` -> data=macbeth), in its defaults' order."""
        out: dict[str, str] = {}
        for f in self.chain(option):
            for d in f.defaults:
                if isinstance(d, dict):
                    for k, v in d.items():
                        out[k.removeprefix("override ").strip().lstrip("/")] = v
        return [f"{k}={v}" for k, v in out.items()]

    def options(self) -> list[str]:
        """The default option first, then the others by name."""
        return sorted(self.files, key=lambda o: (o != self.default, o))

    def meaning(self, key: str) -> tuple[str, str]:
        """(meaning, file) of a key: its comment in the first file that has one, the default option's files first
        (the most basic first), then the other options'."""
        for option in self.options():
            for f in self.chain(option):
                if f.comments.get(key):
                    return f.comments[key], f.name
        first = next(f.name for o in self.options() for f in self.chain(o) if key in f.rows)
        return "", first


@cache
def load_groups() -> dict[str, Group]:
    """Every config group under configs/ with its options' files (read once)."""
    train = read_config(CONFIGS / "train.yaml", prefix="")
    chosen: dict[str, str | None] = {}
    for d in train.defaults:
        if isinstance(d, dict):
            for k, v in d.items():
                chosen[k.removeprefix("override ").strip()] = v
    folders = sorted({p.parent.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")} - {"."})
    known = (*GROUPS, *GLOBAL_GROUPS, *HYDRA_GROUPS, *LOGGING_GROUPS)
    unknown = [g for g in folders if g not in known]
    if unknown:
        raise Undocumented(
            f"config group(s) {', '.join(unknown)} not on the page: add them to GROUPS in docs/make_config_reference.py"
        )
    groups = {}
    for name in folders:
        group = Group(name, chosen.get(name))
        for path in sorted((CONFIGS / name).glob("*.yaml")):
            group.files[path.stem] = read_config(path)
        groups[name] = group
    return groups


# --- rows


@dataclass
class Row:
    key: str
    default: str | None  # shown value of the default option; None: not set there
    others: dict[str, list[str]]  # shown value -> the options (group=option) giving it
    allowed: str
    meaning: str
    source: str  # the file whose comment is the meaning (or that lacks it)


def machine_free(text: str) -> str:
    """A rule's text without this machine's core count (generate.py's threads: from 1 to the cores it may use)."""
    return text.replace(f"from 1 to {usable_cores()}", "from 1 to N")


def allowed_text(key: str, meaning: str, rules: dict[str, Rule]) -> str:
    """The rule's text; without a rule, the choices a comment starts with (`step | epoch: ...`), else empty."""
    if key in rules:
        return machine_free(rules[key][2])
    words = [re.match(r"^([\w./-]+)(?::|\s\(|$)", part) for part in meaning.split(" | ")]
    choices = [m.group(1) for m in words if m]
    return ", ".join(f"`{c}`" for c in choices) if len(choices) == len(words) > 1 else ""


def group_rows(group: Group, rules: dict[str, Rule], keys: list[str] | None = None) -> list[Row]:
    """One row per key of the group's options: the default option's value and the values other options give."""
    merged = {o: group.merged(o) for o in group.options()}
    order = list(dict.fromkeys(k for o in group.options() for k in merged[o][0]))
    rows = []
    for key in keys if keys is not None else order:
        present, value = merged[group.default][1].get(key, (False, None)) if group.default else (False, None)
        default = show(value) if present else None
        others: dict[str, list[str]] = {}
        for option in group.options():
            if option == group.default or key not in merged[option][1]:
                continue
            has, val = merged[option][1][key]
            if has and show(val) != default:
                others.setdefault(show(val), []).append(f"{group.name}={option}")
        meaning, source = group.meaning(key)
        rows.append(Row(key, default, others, allowed_text(key, meaning, rules), meaning, source))
    return rows


def entry_rows(name: str, rules: dict[str, Rule]) -> list[Row]:
    f = read_config(CONFIGS / f"{name}.yaml", prefix="")
    container = OmegaConf.to_container(f.values, resolve=False)
    rows = []
    for key in f.rows:
        meaning = f.comments.get(key, "")
        rows.append(Row(key, show(lookup(container, key)[1]), {}, allowed_text(key, meaning, rules), meaning, f.name))
    return rows


def train_keys(groups: dict[str, Group]) -> set[str]:
    """Every key train.yaml and the groups that hold settings under their own name define."""
    keys = set(read_config(CONFIGS / "train.yaml", prefix="").rows)
    for name in (*GROUPS, *HYDRA_GROUPS):
        keys |= {k for f in groups[name].files.values() for k in f.rows}
    return keys


def global_sets(group: Group, option: str, known: set[str]) -> list[str]:
    """What a recipe, quick check or search sets among the keys defined elsewhere, as key=value."""
    rows, values = group.merged(option)
    return group.overrides(option) + [f"{k}={show(values[k][1])}" for k in rows if k in known]


def global_added(group: Group, known: set[str]) -> list[str]:
    """The keys a global option adds (not defined by train.yaml or a group of its own)."""
    return list(dict.fromkeys(k for o in group.options() for k in group.merged(o)[0] if k not in known))


# --- the page


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    options: list[tuple[str, ...]] = field(default_factory=list)  # option, what it is[, what it sets]
    option_header: tuple[str, ...] = ("option", "what it is")
    rows: list[Row] = field(default_factory=list)


def sections() -> list[Section]:
    """The page's sections in order: train.py and its groups, generate.py, eval.py, then the groups that set keys
    anywhere, then Hydra's."""
    groups = load_groups()
    known = train_keys(groups)
    out = []

    train = Section("train.py (`configs/train.yaml`)")
    train.option_header = ("group", "default", "options")
    train.options = [
        (f"`{g}`", f"`{groups[g].default}`" if groups[g].default else "none", _options(groups[g]))
        for g in (*GROUPS, *GLOBAL_GROUPS)
    ]
    train.rows = entry_rows("train", TRAIN_RULES)
    out.append(train)

    for name in GROUPS:
        group = groups[name]
        section = Section(f"{name} (`configs/{name}/`, `{name}=OPTION`)")
        section.options = [(_option(group, o), group.files[o].header) for o in group.options()]
        section.rows = group_rows(group, TRAIN_RULES)
        if name == "trainer":
            section.notes.append(
                f"The keys the project sets; every other argument of [Lightning's Trainer]({TRAINER_DOCS}) is "
                "added with `+trainer.KEY=VALUE`."
            )
            section.rows += [Row(k, None, {}, allowed_text(k, v, TRAIN_RULES), v, "docs/make_config_reference.py")
                             for k, v in UNSET.items()]  # fmt: skip
        out.append(section)

    generate = Section("generate.py (`configs/generate.yaml`)")
    generate.rows = entry_rows("generate", GENERATE_RULES)
    out.append(generate)
    evaluate = Section("eval.py (`configs/eval.yaml`)")
    evaluate.notes.append("`data=OPTION` picks the text to score from the options of `data` (its keys above).")
    evaluate.rows = entry_rows("eval", EVAL_RULES)
    out.append(evaluate)

    for name in GLOBAL_GROUPS:
        group = groups[name]
        section = Section(f"{name} (`configs/{name}/`, `{name}=OPTION`)")
        section.option_header = ("option", "what it is", "what it sets")
        section.options = [
            (_option(group, o), group.files[o].header, ", ".join(f"`{s}`" for s in global_sets(group, o, known)))
            for o in group.options()
        ]
        section.rows = group_rows(group, TRAIN_RULES, global_added(group, known))
        out.append(section)

    hydra = Section("hydra (`configs/hydra/`)")
    hydra.options = [(f"`{g}={o}`", groups[g].files[o].header) for g in LOGGING_GROUPS for o in groups[g].options()]
    hydra.rows = group_rows(groups["hydra"], {})
    hydra.notes.append(
        f"`configs/hydra/default.yaml` (run and sweep folders). {groups['hydra'].files['default'].header}"
    )
    out.append(hydra)
    launcher = Section("hydra/launcher (`configs/hydra/launcher/`, `hydra/launcher=OPTION` with `-m`)")
    launcher.options = [(_option(groups["hydra/launcher"], o), groups["hydra/launcher"].files[o].header)
                        for o in groups["hydra/launcher"].options()]  # fmt: skip
    launcher.rows = group_rows(groups["hydra/launcher"], {})
    out.append(launcher)
    return out


def _options(group: Group) -> str:
    return ", ".join(f"`{o}`" for o in group.options())


def _option(group: Group, option: str) -> str:
    return f"`{option}` (default)" if option == group.default else f"`{option}`"


def problems() -> list[str]:
    """Every key and option without a meaning, as `FILE: KEY has no comment`."""
    found = []
    for section in sections():
        for row in section.rows:
            if not row.meaning:
                found.append(f"{row.source}: {row.key} has no comment (add `# what it means` on its line)")
    for group in load_groups().values():
        for option, f in group.files.items():
            if not f.header:
                found.append(f"{f.name}: option {group.name}={option} has no comment at the top saying what it is")
    return found


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def default_cell(row: Row) -> str:
    parts = [f"`{row.default}`" if row.default is not None else "—"]
    parts += [", ".join(f"`{o}`" for o in options) + f": `{value}`" for value, options in row.others.items()]
    return "; ".join(parts)


INTRO = """\
# Configuration reference

Every key of `train.py`, `generate.py` and `eval.py`: its default, the values it allows and what it means. This page
is written by `docs/make_config_reference.py` (`make docs`) from the YAML files under `configs/` and the rule tables
the commands check values against; `tests/test_config_reference.py` fails when it no longer matches them.

- `key=value` on the command line sets a key, dotted as in the tables: `data.seq_len=100`,
  `callbacks.early_stopping.patience=5`, `trainer.max_time=00:00:30:00`; `key=null` sets null.
- `group=option` picks one YAML file of a config group: `data=file data.path=my.txt`, `trainer=gpu`,
  `experiment=seed`; a group under `hydra/` the same way: `hydra/launcher=submitit_slurm`. `-m` with
  comma-separated values runs a sweep: `-m model.units=64,128`.
- A key no config sets is added with a leading `+`: `+trainer.gradient_clip_algorithm=value`; any other unknown key
  is refused.
- `--cfg job` prints the config a command line composes, without running it; `--help` lists `train.py`'s groups
  and their options, and `generate.py`'s and `eval.py`'s own settings.

```
python train.py data.seq_len=100 model.units=128 trainer.max_epochs=3
python train.py data=file data.path=my.txt
python train.py experiment=seed --cfg job
```

Columns: **default** is the value of the group's default option, then the values other options give
(`data=file`: `file`); `—`: not set by the default option (the library's own default applies); `${key}` takes
another key's value; `???` must be given. **allowed** is what the command accepts, checked before any work starts
(a value outside it stops the command with one line naming the key and the value); empty: passed on as it is.
**meaning** is the key's comment in its YAML file.
"""


def render() -> str:
    """The page; raises Undocumented, naming each file and key, when a key has no comment."""
    missing = problems()
    if missing:
        raise Undocumented("\n".join(missing))
    out = [INTRO]
    for section in sections():
        out.append(f"## {section.title}\n")
        out += [f"{note}\n" for note in section.notes]
        if section.options:
            out.append(_table(section.option_header, section.options))
        if section.rows:
            table = [(f"`{r.key}`", default_cell(r), r.allowed, r.meaning) for r in section.rows]
            out.append(_table(("key", "default", "allowed", "meaning"), table))
    return "\n".join(out)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rule_tables() -> Iterator[tuple[str, dict[str, Rule]]]:
    yield "train", TRAIN_RULES
    yield "generate", GENERATE_RULES
    yield "eval", EVAL_RULES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is not what it would write")
    args = parser.parse_args()
    try:
        text = render()
    except Undocumented as err:
        print(err, file=sys.stderr)
        return 1
    if args.check:
        same = PAGE.is_file() and PAGE.read_text(encoding="utf-8") == text
        print(f"{PAGE.relative_to(ROOT)} is {'up to date' if same else 'out of date: run make docs'}")
        return 0 if same else 1
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
