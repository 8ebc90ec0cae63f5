"""The combinations users try: every recipe x {a play, their own ASCII file, a CJK file with CRLF line ends} x
{a run that ends before its first validation, one that validates} x the documented switches, plus every debug
preset with every recipe. Never a traceback: each run ends with exit 0 or one error line.

The full product is sampled with a fixed seed to keep it within a minute or two of `make test`."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.conftest import BASE_SHAPE, CONFIG_DIR, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONFIG_DIR / "debug").glob("*.yaml"))
CORPORA = ("play", "ascii", "cjk")
ENDS = {"early": ["trainer.max_steps=3"], "validates": ["trainer.max_steps=6", "trainer.val_check_interval=3"]}
VARIANTS = {
    "plain": [],
    "no-bar": ["trainer.enable_progress_bar=false"],
    "logger-none": ["logger=none"],
    "logger-csv": ["logger=csv"],
    "logger-many": ["logger=many"],
    "callbacks-none": ["callbacks=none"],
    "no-checkpoints": ["trainer.enable_checkpointing=false"],
}
SHRINK = ["data.max_chars=2500", "model.units=8", "model.embed_dim=8", "data.val_max_windows=64",
          "sample.length=10", "trainer.enable_model_summary=false"]  # fmt: skip


def shrink(experiment: str, files: dict[str, Path] | None = None) -> list[str]:
    """SHRINK; experiment=finetune starts from the shipped base model (its shape: no model.units / embed_dim
    shrinking) and trains on the user's own file (data=file: a play is not one of its corpora)."""
    if experiment != "finetune":
        return SHRINK
    own = [f"data.path={files['ascii']}"] if files else []
    return [*[a for a in SHRINK if not a.startswith(BASE_SHAPE)], *own]


ASCII = "def add(a, b):\n    return a + b  # sum\n\nprint(add(2, 3))\n" * 80
CJK = "春眠不觉晓，处处闻啼鸟。\r\n夜来风雨声，花落知多少。\r\n床前明月光，疑是地上霜。\r\n" * 60

_ALL = list(itertools.product(EXPERIMENTS, CORPORA, ENDS, VARIANTS))
SAMPLE = sorted(random.Random(8).sample(_ALL, 40))


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corpora")
    files = {"ascii": folder / "code.py.txt", "cjk": folder / "poems.txt"}
    files["ascii"].write_text(ASCII, encoding="utf-8")
    files["cjk"].write_bytes(CJK.encode("utf-8"))
    return files


def run_cli_in_process(overrides: list[str], tmp_path: Path, data_dir: Path, capsys) -> int:
    """What `python train.py OVERRIDES` does after composition; returns the exit status (the error line, if
    any, is in ``capsys``'s last reading: see ``last_error``)."""
    from charlstm.app.train import run

    cfg = compose_cfg("train", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.outputs_root = str(tmp_path)
        cfg.paths.data_dir = str(data_dir)
    try:
        run(cfg)
    except SystemExit as stop:
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), err
        last_error.append(err[0])
        return int(stop.code or 0)
    return 0


last_error: list[str] = []


def corpus_args(corpus: str, files: dict[str, Path]) -> list[str]:
    return [] if corpus == "play" else ["data=file", f"data.path={files[corpus]}"]


@pytest.mark.parametrize(("experiment", "corpus", "end", "variant"), SAMPLE)
def test_recipe_corpus_length_switch(experiment, corpus, end, variant, corpus_files, tmp_path, data_dir, capsys):
    own = corpus_files if corpus == "play" else None
    overrides = [f"experiment={experiment}", *corpus_args(corpus, corpus_files), *shrink(experiment, own),
                 *ENDS[end], *VARIANTS[variant]]  # fmt: skip
    status = run_cli_in_process(overrides, tmp_path, data_dir, capsys)
    assert status == 0, overrides
    if variant not in ("no-checkpoints",):
        assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    if variant not in ("logger-none", "logger-csv"):
        assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(("experiment", "debug"), list(itertools.product(EXPERIMENTS, DEBUGS)))
def test_every_debug_preset_with_every_recipe(experiment, debug, tmp_path, data_dir, capsys, corpus_files, recwarn):
    overrides = [f"experiment={experiment}", f"debug={debug}", *shrink(experiment, corpus_files), "trainer.max_steps=4"]
    assert run_cli_in_process(overrides, tmp_path, data_dir, capsys) == 0
    # what the preset does by design is not warned about (Lightning turning shuffling off for debug=overfit)
    assert not [w for w in recwarn if "requested to overfit" in str(w.message)]


def test_recipe_typo_is_refused_at_composition(tmp_path, data_dir, capsys):
    """A misspelt key in a recipe file fails like a command-line typo: one line naming the key."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - default\ndata:\n  main_repat: 4\n", encoding="utf-8"
    )
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo", *SHRINK]
    assert run_cli_in_process(overrides, tmp_path, data_dir, capsys) == 1
    assert last_error[-1].startswith(
        "error: data.main_repat is not a setting of charlstm.training.datamodule.CharDataModule; did "
    )
    assert "data.main_repeat" in last_error[-1]
