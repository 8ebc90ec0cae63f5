"""The rule of every configured value, in one form that the config layer (app/config.py) checks before any work and
that the generation API (core/sampling.py) checks for a direct caller; a bad value is one line
``KEY=VALUE is not allowed: it must be WHAT``. Plain Python: no torch, no OmegaConf."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from charlstm.core.errors import ConfigError

# (kind, rule, what is allowed). Kinds: int, float, bool, str, choice (rule: the allowed values), any (rule: a
# predicate on the raw value); a trailing "?" also allows null.
Rule = tuple[str, Callable[[Any], bool] | tuple[Any, ...] | None, str]

INT_GE1: Rule = ("int", lambda v: v >= 1, "an integer >= 1")
INT_GE0: Rule = ("int", lambda v: v >= 0, "an integer >= 0")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def breaks(rule: Rule, value: Any) -> bool:
    """Whether ``value`` breaks ``rule``."""
    kind, test, _ = rule
    optional, base = kind.endswith("?"), kind.rstrip("?")
    if base == "any":
        return not test(value)  # type: ignore[operator]
    if value is None:
        return not optional
    if base == "bool":
        return not isinstance(value, bool)
    if base == "choice":
        return isinstance(value, bool) or value not in test  # type: ignore[operator]
    if base == "str":
        return not isinstance(value, str) or (test is not None and not test(value))  # type: ignore[operator]
    if base == "int":
        return not is_int(value) or not test(value)  # type: ignore[operator]
    if base == "float":
        return not is_number(value) or not test(value)  # type: ignore[operator]
    raise ValueError(f"unknown rule kind {kind!r}")


def refuse(key: str, value: Any, rule: Rule) -> None:
    """Raise the one-line ConfigError for ``key=value`` if the value breaks ``rule``."""
    if breaks(rule, value):
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {rule[2]}")


def check_values(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Raise ConfigError for the first of ``values`` that breaks its rule (in the order of ``rules``)."""
    for key, rule in rules.items():
        if key in values:
            refuse(key, values[key], rule)
