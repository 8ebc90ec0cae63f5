"""requirements.lock (what CI installs, written by `make lock`) agrees with pyproject.toml: every dependency and
dev tool is pinned, each pin lies within the range pyproject.toml allows, and the libraries the code leans on are
capped below their next minor release."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Libraries whose APIs the code uses closely enough that a new minor release may change what it does
CAPPED = ("torch", "pytorch-lightning", "hydra-core", "omegaconf", "hydra-submitit-launcher", "optuna")


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def lock_pins(text: str) -> dict[str, Version]:
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, flags=re.MULTILINE)
    return {canonicalize_name(name): Version(version) for name, version in pins}


def test_every_requirement_is_pinned_within_its_range():
    pins = lock_pins((ROOT / "requirements.lock").read_text())
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": "dev"}):
            continue  # not for this Python
        if name == "torch":  # installed first by the Makefile (a CPU or CUDA build), left out of the lock
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is not in requirements.lock: run make lock"
        assert req.specifier.contains(pins[name]), f"requirements.lock pins {name}=={pins[name]}, outside {req}"


def test_the_libraries_the_code_leans_on_are_capped_below_their_next_minor_release():
    reqs = {canonicalize_name(r.name): r.specifier for r in project_requirements()}
    for name in CAPPED:
        upper = [s for s in reqs[name] if s.operator in ("<", "<=")]
        assert upper, f"{name} has no upper bound in pyproject.toml"
        bound = Version(upper[0].version)
        assert len(bound.release) <= 2 or bound.release[2] == 0, f"{name}'s cap {bound} is not a minor release"
