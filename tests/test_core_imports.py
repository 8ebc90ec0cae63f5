"""The torch-only core (vocab, net, checkpoint, sampling, generate; windows, prepared and evaluate, which eval.py
scores a text with) imports neither Lightning nor the DataModule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE = ("charlstm.vocab", "charlstm.net", "charlstm.checkpoint", "charlstm.sampling", "charlstm.generate",
        "charlstm.windows", "charlstm.prepared", "charlstm.evaluate")  # fmt: skip
TRAINING_FLOOR = ("pytorch_lightning", "lightning_fabric", "lightning", "charlstm.data", "charlstm.model")


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
    loaded = loaded_after("import charlstm.sampling, charlstm.generate")
    assert "pytorch_lightning" not in loaded
    assert "charlstm.data" not in loaded


def test_the_check_sees_lightning_when_it_is_imported():
    # the same probe on the training floor must find it, or the tests above prove nothing
    assert {"pytorch_lightning", "charlstm.data"} <= loaded_after("import charlstm.model")
