"""The command-line face shared by train.py, generate.py and eval.py: prompts taken literally, Hydra's own
errors as one line, and the heavy imports made only once the config is composed (so --help is instant)."""

from __future__ import annotations

import atexit
import contextlib
import difflib
import gc
import importlib
import os
import re
import shlex
import signal
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
    itself (it holds '=', ',', quotes, brackets, escapes ...) and is an existing path or starts with ``~``; else
    None."""
    m = _PATH.match(arg)
    if not m or not (m.group(3).startswith("~") or os.path.exists(m.group(3))):
        return None
    return None if _read_as_typed(arg, m.group(3)) else m


def _read_as_typed(arg: str, text: str) -> bool:
    """Whether Hydra's override parser reads ``KEY=TEXT`` as the one string ``TEXT``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(arg)
    except HydraException:  # its grammar's error, or an OverrideParseException
        return False
    return not override.is_sweep_override() and override.value() == text


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


def _chosen_on_command_line(group: str, name: str, args: Sequence[str]) -> bool:
    """Whether ``args`` choose ``name`` for the config group ``group`` (``experiment=fast``, also in a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        overrides = OverridesParser.create().parse_overrides(_overrides(args))
    except OverrideParseException:
        return False
    for override in overrides:
        if override.key_or_group.lstrip("/") != group:
            continue
        values = override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]
        if name in (str(v) for v in values):
            return True
    return False


def defaults_list_owner(err: BaseException) -> str | None:
    """The config whose defaults list names the missing config of Hydra's ``MissingConfigException`` ``err``
    (``experiment/mine``), or None. Hydra keeps it in the message only (``In 'experiment/mine': Could not load
    'experiment/plais'.``, hydra/_internal/defaults_list.py), so this reads the text; tests/test_cli.py fails if
    Hydra words it otherwise."""
    m = re.match(r"In '([^']+)': Could not load '", str(err))
    return m.group(1) if m else None


def _missing_config_line(err: Any, config_dir: Path, config_name: str, args: Sequence[str]) -> str:
    """One line for Hydra's ``MissingConfigException``: a choice of a config group that is not there, typed on the
    command line or named by a config file's defaults list."""
    group, _, name = str(err.missing_cfg_file).rpartition("/")
    if not group:
        return f"config '{name}' was not found in {config_dir}"
    owner = None if _chosen_on_command_line(group, name, args) else defaults_list_owner(err)
    if owner is not None:
        options, path = _group_and_file(config_dir, config_name, args, group, owner)
        return (
            f"{path}: its defaults list names {name}, which is not a config in {group}/; "
            f"{_closest(name, options)}choices: {', '.join(options) or 'none'}"
        )
    options = list(err.options or [])
    return (
        f"{group}={name} is not a known choice; {_closest(name, options)}"
        f"choices: {', '.join(options) or 'none'} (files in configs/{group}/)"
    )


def _unknown_key_line(key: str, node: Any) -> str:
    """One line for an override of ``key``, which is not in the config: the closest keys beside it in ``node`` (the
    config node that lacks it), else the keys there."""
    from omegaconf import DictConfig

    parent, _, name = key.rpartition(".")
    near = [] if not isinstance(node, DictConfig) else [f"{parent}.{k}" if parent else str(k) for k in node]
    near = [k for k in near if k != "hydra"]  # Hydra's own settings, beside the command's at the top
    close = (
        difflib.get_close_matches(key, near, n=2, cutoff=0.8)
        or [k for k in near if difflib.SequenceMatcher(None, name, k.rpartition(".")[2]).ratio() > 0.75][:2]
    )
    hint = f"did you mean {' or '.join(close)}?" if close else f"settings there: {', '.join(near[:12])}"
    return f"{key} is not a setting: {hint} (to add a new key on purpose: +{key}=VALUE)"


def _parse_failure(override: str) -> str:
    """What Hydra's grammar says of ``override`` alone (the command's error wraps it in more lines)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_override(override)
    except HydraException as err:  # its grammar's error, or an OverrideParseException
        return (str(err).splitlines() or ["a syntax error"])[0]
    return "a syntax error"


def hydra_error_line(err: BaseException, config_dir: Path, config_name: str, args: Sequence[str]) -> str:
    """One line for an error Hydra raised while reading the command line or composing the config, built from the
    fields of its exception types and from the config itself."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    from charlstm.core.errors import storage_error, write_failure

    failed = write_failure(err)  # a run folder that cannot be made (a read-only or full disk)
    if failed is not None:
        return str(storage_error(failed))
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        return _missing_config_line(err, config_dir, config_name, args)
    if isinstance(err, OverrideParseException):
        return (
            f"cannot read the override {err.override!r} ({_parse_failure(err.override)}); quote a value that holds "
            "spaces, commas, brackets or quotes, e.g. key='a, b'"
        )
    cause = err.__cause__
    # Hydra overrides a key with OmegaConf.update on the struct config, and turns OmegaConf's refusal of a key that
    # is not there into "Could not override" with that refusal as the cause: its full_key is the first missing
    # level (`modle` of `modle.units`), its parent_node the config node that lacks it.
    refused = isinstance(err, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError))
    if refused and cause.full_key:
        return _unknown_key_line(str(cause.full_key), cause.parent_node)
    # a value of the wrong type for a typed config (a launcher's schema): OmegaConf names the key and the value
    if isinstance(err, ConfigCompositionException) and isinstance(cause, ValidationError) and cause.full_key:
        return f"{cause.full_key}={cause.value!r} is not allowed: {str(cause).splitlines()[0]}"
    return " ".join(str(err).split())


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
    ``--cfg``; None for any other error. Hydra raises these as a bare ValueError (hydra/_internal/utils.py,
    _run_hydra), with nothing but its text to tell them apart, so this reads the text; tests/test_cli.py fails if
    Hydra words them otherwise."""
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


@contextlib.contextmanager
def _ctrl_c_held() -> Any:
    """Ctrl-C while torch and Lightning load is held until they have loaded, then raised. Raised inside their
    start-up, it is lost (torch's C++ start-up imports numpy and takes a failed import for "no numpy") or ends the
    process with SIGABRT and a C++ message (a KeyboardInterrupt thrown through pybind11)."""
    pressed: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # a background job started with Ctrl-C ignored
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _task(task: str) -> Any:
    module_name, _, function = task.partition(":")
    with _ctrl_c_held():
        module = importlib.import_module(module_name)
    return getattr(module, function or "run")


def quiet_schema_note() -> None:
    """configs/hydra/launcher/submitit_*.yaml share their names with hydra-submitit-launcher's schemas on purpose:
    Hydra checks them against those schemas (types, known keys) and says so in a deprecation note each time."""
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore")


def hydra_entry(config_dir: Path, config_name: str, task: str) -> Any:
    """Run ``task`` (``module:function`` taking the composed config) under ``@hydra.main``.

    Hydra's own errors (unknown choice, mistyped key, unreadable override) become one ``error:`` line and
    exit status 1; ``HYDRA_FULL_ERROR=1`` set by the user still shows Hydra's full traceback. A launcher's
    error (a cluster job that failed) is its one line too. A command that fails takes away the run and sweep
    folders it claimed and left unused (e.g. a launcher refused before the first job).
    """
    # At exit, once the exit handlers registered while the command ran are done (logs flushed, files closed), the
    # interpreter's teardown would still collect garbage over every object torch and Lightning made: 0.8 s after
    # importing Lightning, 0.3 s after torch alone (benchmarks/startup_bench.py). Objects alive at exit need not be
    # finalized (Python's data model), so the command freezes them out of that collection. Exit handlers run
    # last-in, first-out: this one, registered before the command's, runs after them. An in-process caller is
    # unaffected until its interpreter exits.
    atexit.register(gc.freeze)
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
