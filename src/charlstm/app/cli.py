"""The command-line face shared by train.py, generate.py and eval.py: prompts taken literally, Hydra's own
errors as one line, and the heavy imports made only once the config is composed (so --help is instant).
A command line of plain ``key=value`` settings of a flat config (generate.py's) is read without Hydra at all."""

from __future__ import annotations

import atexit
import difflib
import gc
import importlib
import os
import re
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Keys whose value is free text: passed to Hydra quoted, so quotes, commas, '=', brackets and any script
# arrive exactly as the shell gave them.
LITERAL_KEYS = ("prompt", "sample.prompt", "callbacks.text_sample.prompt")


def _override_of(keys: Sequence[str]) -> re.Pattern[str]:
    """``[+|++]KEY=VALUE`` for one of ``keys``: groups (prefix, key, value)."""
    return re.compile(r"^(\+{0,2})(" + "|".join(re.escape(k) for k in keys) + r")=(.*)$", re.DOTALL)


_LITERAL = _override_of(LITERAL_KEYS)
# Keys naming a file: a value that is an existing path is taken literally too (a sweep's job folders hold '=' and
# ',', e.g. outputs/multirun/.../1_model.units=128/checkpoints/last.ckpt), and so is one starting with `~` (the shell
# expands `~` only at the start of a word, so `data.path=~/my.txt` arrives as typed, and Hydra's grammar has no
# unquoted `~` in a value; the path is expanded where it is read); anything else, such as `last` or a sweep over
# several files (`data.path=a.txt,b.txt`), goes to Hydra as written.
PATH_KEYS = ("ckpt", "ckpt_path", "data.path", "prompt_file", "output")
_PATH = _override_of(PATH_KEYS)
# Set once this command line's free-text values are quoted for Hydra. Lightning starts the other DDP ranks by running
# the command line again, with this environment: quoted a second time, a value would keep its quotes as text.
QUOTED_ENV = "CHARLSTM_ARGS_QUOTED"


def omegaconf_literal(value: str) -> str:
    """``value`` as an OmegaConf string that reads back unchanged (no interpolation)."""
    # a literal "${" is written "\${", with the backslashes right before it doubled
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)


def quote_value(value: str) -> str:
    """``value`` as a Hydra quoted string that OmegaConf reads back unchanged (no interpolation)."""
    value = omegaconf_literal(value)
    # Hydra: backslashes before a quote or at the very end are doubled, then the quote is escaped.
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def literal_args(args: Sequence[str]) -> list[str]:
    """Command-line overrides with the free-text ones quoted for Hydra; everything else unchanged."""
    out = []
    for arg in args:
        m = _LITERAL.match(arg) or literal_path(arg)
        out.append(f"{m.group(1)}{m.group(2)}={quote_value(m.group(3))}" if m else arg)
    return out


def literal_path(arg: str) -> re.Match[str] | None:
    """The match of ``arg`` when it is ``KEY=VALUE`` for a file-naming key whose value Hydra would not read back as
    itself (it holds '=', ',', quotes, brackets, spaces ...) and is an existing path or starts with ``~``; else
    None."""
    m = _PATH.match(arg)
    if not m or plain_value(m.group(3)) is not _NOT_PLAIN:
        return None
    return m if m.group(3).startswith("~") or os.path.exists(m.group(3)) else None


# The folder of train.py, generate.py and eval.py (an editable install: src/charlstm/app/cli.py under it)
ENTRY_DIR = Path(__file__).resolve().parents[3]


def command_line(script: str, *args: str) -> str:
    """``SCRIPT ARGS`` as a line that works when pasted into a fresh shell in the current folder: run by this
    interpreter named by its path (``.venv/bin/python``: a fresh shell has no environment active, and its
    ``python`` may not have charlstm), the script by its path, each word quoted for the shell where needed.
    Paths inside the current folder are shown relative to it."""

    def shown(path: Path) -> str:
        path = Path(os.path.abspath(path))  # not resolved: .venv/bin/python is a link to the base interpreter
        return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)

    python = shown(Path(sys.executable))
    entry = Path(sys.argv[0]) if sys.argv and Path(sys.argv[0]).name == script else ENTRY_DIR / script
    return shlex.join([python if os.sep in python else f".{os.sep}{python}", shown(entry), *args])


def _overrides(args: Sequence[str]) -> list[str]:
    return [a for a in args if (not a.startswith("-") and "=" in a) or a.startswith("~")]


def _closest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=2, cutoff=0.6)
    return f"did you mean {' or '.join(close)}? " if close else ""


def _bad_override(args: Sequence[str]) -> str | None:
    """The first override Hydra's parser cannot read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in _overrides(args):
        try:
            parser.parse_override(arg)
        except Exception:  # any parse failure names this override
            return arg
    return None


def _keys_near(config_dir: Path, config_name: str, args: Sequence[str], key: str) -> list[str]:
    """The keys beside ``key`` in the config composed without the overrides that name it."""
    from hydra import compose, initialize_config_dir

    parent, _, _ = key.rpartition(".")
    rest = [a for a in _overrides(args) if not a.lstrip("+~").startswith(key)]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
            cfg = compose(config_name=config_name, overrides=rest)
    except Exception:  # the other overrides are broken too: no suggestion then
        return []
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return []
    return [f"{parent}.{k}" if parent else str(k) for k in node]


def _group_and_file(config_dir: Path, config_name: str, args: Sequence[str], group: str, name: str):
    """The configs of ``group``, and the file of the config ``name`` (``experiment/mine``), in the config search
    path of this command (``configs/`` and the folders its ``hydra.searchpath`` adds)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    folders, options = [Path(config_dir)], []
    try:
        for override in OverridesParser.create().parse_overrides(_overrides(args)):
            if override.get_key_element() == "hydra.searchpath":
                folders += [Path(str(p)[7:]) for p in override.value() or [] if str(p).startswith("file://")]
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
            loader = GlobalHydra.instance().config_loader()
            options = sorted(loader.get_group_options(group, config_name=config_name, overrides=_overrides(args)))
    except Exception:  # the search path itself is broken: no suggestion then
        pass
    path = next((f / f"{name}.yaml" for f in folders if (f / f"{name}.yaml").is_file()), folders[0] / f"{name}.yaml")
    return options, os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)


def hydra_error_line(err: BaseException, config_dir: Path, config_name: str, args: Sequence[str]) -> str:
    """One line for an error Hydra raised while reading the command line or composing the config."""
    from hydra.errors import MissingConfigException, OverrideParseException

    from charlstm.core.errors import storage_error, write_failure

    failed = write_failure(err)  # a run folder that cannot be made (a read-only or full disk)
    if failed is not None:
        return str(storage_error(failed))
    text = " ".join(str(err).split())
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        options = list(err.options or [])
        parent = re.match(r"In '([^']+)': Could not load", str(err))
        if group and parent:  # a config file's own defaults list names a file that is not there
            options, path = _group_and_file(config_dir, config_name, args, group, parent.group(1))
            return (
                f"{path}: its defaults list names {name}, which is not a config in {group}/; "
                f"{_closest(name, options)}choices: {', '.join(options) or 'none'}"
            )
        if group:
            return (
                f"{group}={name} is not a known choice; {_closest(name, options)}"
                f"choices: {', '.join(options) or 'none'} (files in configs/{group}/)"
            )
        return f"config '{name}' was not found in {config_dir}"
    if isinstance(err, OverrideParseException):
        bad = _bad_override(args)
        where = f"the override {bad!r}" if bad else "an override"
        return (
            f"cannot read {where} ({text.split(' See https')[0]}); quote a value that holds spaces, commas, "
            "brackets or quotes, e.g. key='a, b'"
        )
    cause = err.__cause__
    m = re.search(r"full_key: (\S+)", str(cause)) if cause is not None else None
    if m and "not in struct" in str(cause):
        key = m.group(1)
        near = _keys_near(config_dir, config_name, args, key)
        name = key.rpartition(".")[2]
        close = (
            difflib.get_close_matches(key, near, n=2, cutoff=0.8)
            or [k for k in near if difflib.SequenceMatcher(None, name, k.rpartition(".")[2]).ratio() > 0.75][:2]
        )
        hint = f"did you mean {' or '.join(close)}?" if close else f"settings there: {', '.join(near[:12])}"
        return f"{key} is not a setting: {hint} (to add a new key on purpose: +{key}=VALUE)"
    return text


def launcher_without_multirun(args: Sequence[str]) -> str | None:
    """``hydra/launcher=X`` on a command that is not a multirun (where Hydra would quietly run it here)."""
    chosen = next((a for a in args if a.startswith("hydra/launcher=")), None)
    modes = {"-m", "--multirun", "-c", "--cfg", "-i", "--info", "-h", "--help", "--hydra-help", "-sc"}
    if chosen is None or modes & set(args) or any(a.startswith("--shell-completion") for a in args):
        return None
    return chosen


# Hydra's modes, of which one command takes one (hydra/_internal/utils.py, _run_hydra)
_MODES = {"-m": "-m", "--multirun": "-m", "-r": "--run", "--run": "--run", "-c": "--cfg", "--cfg": "--cfg",
          "-i": "--info", "--info": "--info", "-sc": "--shell-completion",
          "--shell-completion": "--shell-completion"}  # fmt: skip


def _first_sweep(args: Sequence[str]) -> str | None:
    """``model.units=8`` for ``model.units=8,16``: the first swept override of ``args`` at its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in _overrides(args):
        try:
            override = parser.parse_override(arg)
        except Exception:  # Hydra reports it itself
            continue
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()), None)
            return f"{override.get_key_element()}={first}" if first is not None else None
    return None


def mode_error_line(err: ValueError, args: Sequence[str]) -> str | None:
    """One line for Hydra's refusal of two modes in one command (``-m`` with ``--cfg``) or of ``--resolve`` without
    ``--cfg``; None for any other error."""
    if str(err).startswith("The --resolve flag can only be used"):
        return "--resolve applies to --cfg (or --help): add --cfg job to print the resolved config, or drop --resolve"
    if not str(err).startswith("Only one of --run, --multirun, --cfg"):
        return None
    given = list(dict.fromkeys(_MODES[a.split("=", 1)[0]] for a in args if a.split("=", 1)[0] in _MODES))
    if "-m" in given and ("--cfg" in given or "--info" in given):
        shown = "--cfg prints the config" if "--cfg" in given else "--info describes the composition"
        example = _first_sweep(args)
        fix = f"drop -m and give each swept key one value, e.g. {example}" if example else "drop -m"
        return (
            f"{shown} of one run, and Hydra does not combine it with -m: {fix} (each job of a sweep saves its own "
            "config.yaml in its folder)"
        )
    return f"{' and '.join(given) or 'these options'} cannot be used together: Hydra takes one of -m, --run, --cfg, " \
           "--info and --shell-completion per command"  # fmt: skip


# What Hydra's override grammar reads as one plain scalar; any other value (quotes, lists, sweeps, interpolations,
# escapes, spaces, `1_000`, `inf`, `~`, a leading digit or sign that is not a number ...) goes through Hydra.
_INT = re.compile(r"[+-]?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][+-]?[0-9]+)")
_WORD = re.compile(r"[A-Za-z/][A-Za-z0-9_./@-]*")
_KEY = re.compile(r"[a-z][a-z0-9_]*")
_NOT_PLAIN = object()


def plain_value(text: str) -> Any:
    """The value Hydra gives ``key=TEXT`` when TEXT is a plain int, float, bool, null or word; else ``_NOT_PLAIN``."""
    low = text.lower()
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    if low in ("inf", "nan") or not _WORD.fullmatch(text):
        return _NOT_PLAIN
    return text


def plain_config(config_dir: Path, config_name: str, args: Sequence[str]) -> Any:
    """The config Hydra would compose for ``args``, read without Hydra, when that is certain to be the same: the
    config file composes nothing but itself (its defaults only ``_self_`` and Hydra's own settings, no
    interpolation), and every argument is ``key=value`` for one of its top-level keys, once, with a plain value
    (free-text keys such as ``prompt`` take any text, as Hydra is given it quoted). Otherwise None: Hydra reads it."""
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.load(Path(config_dir) / f"{config_name}.yaml")
    defaults = cfg.pop("defaults", [])
    cfg.pop("hydra", None)
    own = all(d == "_self_" or (isinstance(d, DictConfig) and all(str(k).startswith("override hydra/") for k in d))
              for d in defaults)  # fmt: skip
    if not own or "${" in str(OmegaConf.to_container(cfg, resolve=False)):
        return None
    seen = set()
    for arg in args:
        key, eq, text = arg.partition("=")
        if not eq or not _KEY.fullmatch(key) or key not in cfg or key in seen:
            return None
        seen.add(key)
        literal = key in LITERAL_KEYS or literal_path(arg) is not None
        value = omegaconf_literal(text) if literal else plain_value(text)
        if value is _NOT_PLAIN:
            return None
        cfg[key] = value
    OmegaConf.set_struct(cfg, True)
    return cfg


_CLOSING = {"[": "]", "{": "}", "(": ")"}


def split_by_shell(args: Sequence[str]) -> str | None:
    """One line for an override the shell split at its spaces: ``data.vocab=["a", " ", "b"]`` typed unquoted arrives
    as ``data.vocab=[a,`` `` ,`` ``b]``, which Hydra reports as an unreadable override or, when a piece starts with
    ``-``, as unknown options under its usage text. None when every override's brackets close."""
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if not eq or arg.startswith("-") or key.lstrip("+~") in (*LITERAL_KEYS, *PATH_KEYS):
            continue
        depth = sum(value.count(o) - value.count(c) for o, c in _CLOSING.items())
        pieces = 1
        for rest in args[i + 1 :]:
            if depth <= 0:
                break
            depth += sum(rest.count(o) - rest.count(c) for o, c in _CLOSING.items())
            pieces += 1
        if pieces > 1:
            return (
                f"{key}={value}... was split by the shell at its spaces into {pieces} arguments; put the whole "
                f"override in single quotes, with double quotes around an item that is or holds a space, e.g. "
                f'\'{key}=["a", " ", "b"]\''
            )
    return None


def _task(task: str) -> Any:
    module_name, _, function = task.partition(":")
    return getattr(importlib.import_module(module_name), function or "run")


def quiet_schema_note() -> None:
    """configs/hydra/launcher/submitit_*.yaml share their names with hydra-submitit-launcher's schemas on purpose:
    Hydra checks them against those schemas (types, known keys) and says so in a deprecation note each time."""
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore")


def hydra_entry(config_dir: Path, config_name: str, task: str, plain: bool = False) -> Any:
    """Run ``task`` (``module:function`` taking the composed config) under ``@hydra.main``.

    Hydra's own errors (unknown choice, mistyped key, unreadable override) become one ``error:`` line and
    exit status 1; ``HYDRA_FULL_ERROR=1`` set by the user still shows Hydra's full traceback. A launcher's
    error (a cluster job that failed) is its one line too. A command that fails takes away the run and sweep
    folders it claimed and left unused (e.g. a launcher refused before the first job). With ``plain``, a command
    line :func:`plain_config` can read runs ``task`` without Hydra (generate.py: its start-up is then little more
    than importing torch).
    """
    # At exit, once the exit handlers registered while the command ran are done (logs flushed, files closed), the
    # interpreter's teardown would still collect garbage over every object torch and Lightning made: 0.8 s after
    # importing Lightning, 0.3 s after torch alone (benchmarks/startup_bench.py). Objects alive at exit need not be
    # finalized (Python's data model), so the command freezes them out of that collection. Exit handlers run
    # last-in, first-out: this one, registered before the command's, runs after them. An in-process caller is
    # unaffected until its interpreter exits.
    atexit.register(gc.freeze)
    if plain:
        cfg = plain_config(config_dir, config_name, sys.argv[1:])
        if cfg is not None:
            return _task(task)(cfg)
    split = split_by_shell(sys.argv[1:])
    if split:
        print(f"error: {split}", file=sys.stderr, flush=True)
        sys.exit(1)
    import hydra

    from charlstm.app.rundir import discard_unused, register_resolvers
    from charlstm.core.errors import CharLSTMError

    register_resolvers()  # run and sweep folders (configs/hydra/default.yaml)
    quiet_schema_note()

    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Makes Hydra raise instead of printing its multi-line report, so the error can be said in one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    rank_started_by_lightning = os.environ.get(QUOTED_ENV) == "1" and os.environ.get("LOCAL_RANK", "0") != "0"
    typed = sys.argv[1:]
    args = typed if rank_started_by_lightning else literal_args(typed)
    os.environ[QUOTED_ENV] = "1"
    sys.argv = [sys.argv[0], *args]
    launcher = launcher_without_multirun(args)
    if launcher:
        print(f"error: {launcher} applies to -m runs only (Hydra launches multiruns; one job is fine): "
              f"{command_line(Path(sys.argv[0]).name, '-m', *typed)}", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(1)

    def main(cfg: Any) -> Any:
        return _task(task)(cfg)

    # Hydra names the job (and so the log file: train.log) after the module of the task function.
    main.__module__ = Path(sys.argv[0]).stem or config_name
    main = hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(main)

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return main()
    except (HydraException, OmegaConfBaseException) as err:
        discard_unused()
        if user_full_error:
            raise
        print(f"error: {hydra_error_line(err, config_dir, config_name, args)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except CharLSTMError as err:
        discard_unused()
        print(f"{err.prefix}: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except (OSError, ValueError) as err:
        from charlstm.core.errors import storage_error, write_failure

        # Hydra's own writes (the run folder, .hydra/, the log file, which logging reports as a ValueError raised
        # from the OSError): a read-only or full disk
        failed = write_failure(err)
        if failed is not None and not user_full_error:
            discard_unused()
            print(f"error: {storage_error(failed)}", file=sys.stderr, flush=True)
            sys.exit(1)
        discard_unused()
        if isinstance(err, OSError):
            raise
        line = mode_error_line(err, args)
        if line is None or user_full_error:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)
    except BaseException as err:
        if not (isinstance(err, SystemExit) and err.code in (0, None)):
            discard_unused()
        raise
