"""The command-line face shared by train.py, generate.py and eval.py: prompts taken literally, Hydra's own
errors as one line, and the heavy imports made only once the config is composed (so --help is instant)."""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Keys whose value is free text: passed to Hydra quoted, so quotes, commas, '=', brackets and any script
# arrive exactly as the shell gave them.
LITERAL_KEYS = ("prompt", "sample.prompt", "callbacks.text_sample.prompt")
_LITERAL = re.compile(r"^(\+{0,2})(" + "|".join(re.escape(k) for k in LITERAL_KEYS) + r")=(.*)$", re.DOTALL)


def quote_value(value: str) -> str:
    """``value`` as a Hydra quoted string that OmegaConf reads back unchanged (no interpolation)."""
    # OmegaConf: a literal "${" is written "\${", with the backslashes right before it doubled.
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    # Hydra: backslashes before a quote or at the very end are doubled, then the quote is escaped.
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def literal_args(args: Sequence[str]) -> list[str]:
    """Command-line overrides with the free-text ones quoted for Hydra; everything else unchanged."""
    out = []
    for arg in args:
        m = _LITERAL.match(arg)
        out.append(f"{m.group(1)}{m.group(2)}={quote_value(m.group(3))}" if m else arg)
    return out


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


def hydra_error_line(err: BaseException, config_dir: Path, config_name: str, args: Sequence[str]) -> str:
    """One line for an error Hydra raised while reading the command line or composing the config."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = " ".join(str(err).split())
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        options = list(err.options or [])
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


def hydra_entry(config_dir: Path, config_name: str, task: str) -> Any:
    """Run ``task`` (``module:function`` taking the composed config) under ``@hydra.main``.

    Hydra's own errors (unknown choice, mistyped key, unreadable override) become one ``error:`` line and
    exit status 1; ``HYDRA_FULL_ERROR=1`` set by the user still shows Hydra's full traceback. A launcher's
    error (a cluster job that failed) is its one line too.
    """
    import hydra

    from charlstm.cluster import quiet_schema_note
    from charlstm.errors import CharLSTMError
    from charlstm.rundir import register_resolvers

    register_resolvers()  # run and sweep folders (configs/hydra/default.yaml)
    quiet_schema_note()

    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Makes Hydra raise instead of printing its multi-line report, so the error can be said in one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    args = literal_args(sys.argv[1:])
    sys.argv = [sys.argv[0], *args]
    launcher = launcher_without_multirun(args)
    if launcher:
        print(f"error: {launcher} applies to -m runs only (Hydra launches multiruns; one job is fine): "
              f"python {Path(sys.argv[0]).name} -m {' '.join(args)}", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(1)
    module_name, _, function = task.partition(":")

    def main(cfg: Any) -> Any:
        return getattr(importlib.import_module(module_name), function or "run")(cfg)

    # Hydra names the job (and so the log file: train.log) after the module of the task function.
    main.__module__ = Path(sys.argv[0]).stem or config_name
    main = hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(main)

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return main()
    except (HydraException, OmegaConfBaseException) as err:
        if user_full_error:
            raise
        print(f"error: {hydra_error_line(err, config_dir, config_name, args)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except CharLSTMError as err:
        print(f"{err.prefix}: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
