"""generate.py and eval.py score and sample without the training layer: the core and data layers (and the
generate/evaluate commands over them) load neither Lightning nor the DataModule. `lint-imports` (make lint) checks
the same of every import, statically; this checks what a fresh interpreter really loads."""

from __future__ import annotations

import json
import subprocess
import sys

CORE = (
    "charlstm.core.vocab",
    "charlstm.core.net",
    "charlstm.core.checkpoint",
    "charlstm.core.sampling",
    "charlstm.app.generate",
    "charlstm.data.windows",
    "charlstm.data.prepared",
    "charlstm.app.evaluate",
)
TRAINING_FLOOR = (
    "pytorch_lightning",
    "lightning_fabric",
    "lightning",
    "charlstm.training.datamodule",
    "charlstm.training.model",
)


def loaded_after_each(modules: tuple[str, ...]) -> dict[str, set[str]]:
    """Import ``modules`` one after another in a fresh interpreter: the names in sys.modules after each import."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    print(json.dumps([name, sorted(sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return {name: set(loaded) for name, loaded in (json.loads(line) for line in out.splitlines() if line[:1] == "[")}


def test_core_modules_import_no_training_floor():
    # a module that pulls in the floor is caught at its own import (had an earlier one pulled it in, it would be
    # caught there instead)
    after = loaded_after_each(CORE)
    assert list(after) == list(CORE)
    for module, loaded in after.items():
        assert module in loaded
        assert not loaded & set(TRAINING_FLOOR), f"{module} pulled in {sorted(loaded & set(TRAINING_FLOOR))}"


def test_the_check_sees_lightning_when_it_is_imported():
    # the same probe on the training floor must find it, or the test above proves nothing
    after = loaded_after_each(("charlstm.core.vocab", "charlstm.training.model"))
    assert not after["charlstm.core.vocab"] & set(TRAINING_FLOOR)
    assert {"pytorch_lightning", "charlstm.training.datamodule"} <= after["charlstm.training.model"]


def test_the_layer_map_in_the_docs_names_every_module():
    """docs/layers.md lists every module of every layer in that layer's table, and no module that is gone."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "layers.md").read_text(encoding="utf-8")
    for layer in ("core", "data", "training", "app"):
        section = text.split(f"\n## {layer} ", 1)[1].split("\n## ", 1)[0]
        listed = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
        modules = {p.stem for p in (root / "src" / "charlstm" / layer).glob("*.py") if p.stem != "__init__"}
        assert listed == modules, f"docs/layers.md, {layer}: missing {modules - listed}, gone {listed - modules}"
