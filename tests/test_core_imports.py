"""generate.py and eval.py score and sample without the training layer: the core and data layers (and the
generate/evaluate commands over them) load neither Lightning nor the DataModule. `lint-imports` (make lint) checks
the same of every import, statically; this checks what a fresh interpreter really loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def loaded_after(code: str) -> set[str]:
    """The module names in sys.modules after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_training_floor(module):
    loaded = loaded_after(f"import {module}")
    assert module in loaded
    assert not loaded & set(TRAINING_FLOOR), f"{module} pulled in {sorted(loaded & set(TRAINING_FLOOR))}"


def test_sampling_and_generate_together_leave_lightning_out():
    loaded = loaded_after("import charlstm.core.sampling, charlstm.app.generate")
    assert "pytorch_lightning" not in loaded
    assert "charlstm.training.datamodule" not in loaded


def test_the_check_sees_lightning_when_it_is_imported():
    # the same probe on the training floor must find it, or the tests above prove nothing
    assert {"pytorch_lightning", "charlstm.training.datamodule"} <= loaded_after("import charlstm.training.model")
