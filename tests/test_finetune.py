"""init_from: a new run from a trained checkpoint's weights (the shipped base model or any run's), the vocabulary
extended by the new text's chars, and the refusals (another shape, a resume at the same time, a lowercase model
asked to keep case)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from charlstm.app.train import train
from charlstm.core import finetune
from charlstm.core.net import CharLSTM
from tests.cli import SHRINK, ok, one_line_error, run_cli
from tests.conftest import TUTORIAL_SHAPE
from tests.test_tensorboard import session_hparams

ROOT = Path(__file__).resolve().parents[1]


def nets(old: list[str], new: list[str], encoding: str = "embedding") -> tuple[CharLSTM, CharLSTM]:
    torch.manual_seed(0)
    a = CharLSTM(len(old), 8, 2, 0.0, encoding, 4)
    b = CharLSTM(len(new), 8, 2, 0.0, encoding, 4)
    with torch.no_grad():  # trained-looking weights: no row equals the mean by chance
        for p in a.parameters():
            p.normal_()
    finetune.transfer(b, a.state_dict(), old, new, "test")
    return a, b


def test_new_chars_get_new_rows_and_known_chars_keep_theirs():
    old = list("abc")
    new = finetune.extended_vocab(old, list("{bca"))
    assert new == list("abc{")
    a, b = nets(old, new)
    for name in ("embed.weight", "head.weight", "head.bias"):
        assert torch.equal(b.state_dict()[name][:3], a.state_dict()[name])
    assert torch.allclose(b.embed.weight[3], a.embed.weight.mean(0))
    assert torch.allclose(b.head.weight[3], a.head.weight.mean(0))
    assert b.head.bias[3] == a.head.bias.min()
    for name, value in a.lstm.state_dict().items():
        assert torch.equal(b.lstm.state_dict()[name], value)


def test_new_chars_are_numbered_in_sorted_order_with_rows_moved_by_char():
    old = list("bd")
    new = finetune.extended_vocab(old, list("abcd"))
    assert new == list("abcd")
    a, b = nets(old, new)
    assert torch.equal(b.embed.weight[1], a.embed.weight[0]) and torch.equal(b.embed.weight[3], a.embed.weight[1])
    assert torch.equal(b.head.bias[[1, 3]], a.head.bias)


def test_chars_the_text_lacks_stay_in_the_vocabulary():
    old = list("abcz")
    new = finetune.extended_vocab(old, list("ab"))
    assert new == old
    a, b = nets(old, new)
    assert torch.equal(b.head.weight, a.head.weight) and torch.equal(b.embed.weight, a.embed.weight)


def test_equal_vocabularies_give_the_same_network():
    old = list("abc")
    a, b = nets(old, finetune.extended_vocab(old, old))
    x = torch.tensor([[0, 1, 2, 1]])
    assert torch.equal(a(x)[0], b(x)[0])


def test_onehot_input_gets_a_column_per_new_char():
    a, b = nets(list("ab"), list("abc"), encoding="onehot")
    w_a, w_b = a.lstm.weight_ih_l0, b.lstm.weight_ih_l0
    assert torch.equal(w_b[:, :2], w_a) and torch.allclose(w_b[:, 2], w_a.mean(1))


# -- runs ---------------------------------------------------------------------------------------------------------
BASE = ["~experiment", *TUTORIAL_SHAPE,
        "data.max_chars=4000", "data.lowercase=false", "model.encoding=embedding", "model.units=16",
        "model.embed_dim=8", "data.val_max_windows=64", "trainer.max_epochs=1", "trainer.enable_model_summary=false",
        "callbacks.rich_progress_bar=null", "sample.length=0"]  # fmt: skip


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A tiny case-preserving embedding model trained on Macbeth: the checkpoint runs start from."""
    from tests.conftest import compose_cfg

    root = tmp_path_factory.mktemp("base")
    cfg = compose_cfg("train", BASE)
    cfg.paths.output_dir, cfg.paths.outputs_root, cfg.paths.data_dir = str(root / "run"), str(root), str(data_dir)
    train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt"


def test_a_run_from_init_from_starts_new_with_the_extended_vocabulary(make_cfg, base_ckpt, text_file, tmp_path):
    text = text_file("def f(x):\n    return {x: [x]}  # code\n" * 60)
    old = torch.load(base_ckpt, weights_only=True)["hyper_parameters"]["vocab"]
    cfg = make_cfg(*BASE[1:], "data=file", f"data.path={text}", f"init_from={base_ckpt}")
    _, objects = train(cfg)
    model = objects.model
    assert model.hparams.init_from == str(base_ckpt.resolve())
    assert model.hparams.vocab == sorted(set(old) | set(text.read_text()))  # '{', '[', '#' ... added, none dropped
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.init_from == str(base_ckpt.resolve()) and list(saved.data.vocab) == model.hparams.vocab
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["init_from"] == str(base_ckpt.resolve())
    assert ckpt["global_step"] == objects.trainer.global_step  # a new run: its own steps, from 0
    assert session_hparams(tmp_path / "run")["init_from"] == str(base_ckpt.resolve())


def test_eval_py_shows_what_a_checkpoint_was_initialised_from(make_cfg, base_ckpt, text_file, tmp_path):
    text = text_file("A new text, with {braces}.\n" * 80)
    train(make_cfg(*BASE[1:], "data=file", f"data.path={text}", f"init_from={base_ckpt}", "logger=none"))
    done = ok(run_cli("eval.py", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path))
    assert done.stdout.strip().endswith(f"initialised from {base_ckpt.resolve()}")


def test_init_from_with_another_model_shape_is_one_line(base_ckpt, tmp_path):
    done = run_cli("train.py", *SHRINK, f"init_from={base_ckpt}", "model.units=12", cwd=tmp_path)
    line = one_line_error(done)
    assert f"init_from={base_ckpt} has model.units=16 but this run has model.units=12" in line


def test_init_from_with_ckpt_path_is_one_line(base_ckpt, tmp_path):
    done = run_cli("train.py", f"init_from={base_ckpt}", f"ckpt_path={base_ckpt}", cwd=tmp_path)
    line = one_line_error(done)
    assert "init_from=" in line and "ckpt_path=" in line and "pass only one" in line


def test_a_lowercase_model_cannot_start_a_case_preserving_run(tmp_path, base_ckpt):
    ckpt = torch.load(base_ckpt, weights_only=True)
    ckpt["hyper_parameters"]["lowercase"] = True
    lower = tmp_path / "lower.ckpt"
    torch.save(ckpt, lower)
    done = run_cli("train.py", *SHRINK, f"init_from={lower}", "model.units=16", "model.embed_dim=8",
                   "data.lowercase=false", cwd=tmp_path)  # fmt: skip
    line = one_line_error(done)
    assert "was trained on lowercased text" in line and "data.lowercase=true" in line


def test_init_from_a_missing_file_is_one_line(tmp_path):
    line = one_line_error(run_cli("train.py", f"init_from={tmp_path / 'nope.ckpt'}", cwd=tmp_path))
    assert "nope.ckpt does not exist" in line and "init_from=PATH" in line


# -- the shipped base model ---------------------------------------------------------------------------------------
def recorded_score() -> float:
    readme = (finetune.base_path().parents[2] / "README.md").read_text()
    return float(re.search(r"validation bits/char: ([0-9.]+)", readme).group(1))


def test_export_keeps_the_hyperparameters_and_half_precision_weights_only(base_ckpt, tmp_path):
    dest = finetune.export(base_ckpt, tmp_path / "small" / "base.ckpt")
    full = torch.load(base_ckpt, map_location="cpu", weights_only=True)
    small = torch.load(dest, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in small and small["hyper_parameters"] == full["hyper_parameters"]
    assert small["global_step"] == full["global_step"] and small["state_dict"]
    for name, value in small["state_dict"].items():
        assert value.dtype == torch.float16 and torch.equal(value, full["state_dict"][name].half()), name
    assert [p.name for p in dest.parent.iterdir()] == ["base.ckpt"]  # written whole, no temporary left


def test_the_shipped_base_loads_with_weights_only_and_builds():
    from charlstm.core.checkpoint import build_net

    ckpt = torch.load(finetune.base_path(), map_location="cpu", weights_only=True)
    net = build_net(ckpt, finetune.base_path())
    assert net.vocab_size == len(ckpt["hyper_parameters"]["vocab"]) and not ckpt["hyper_parameters"]["lowercase"]
    assert finetune.base_path().stat().st_size <= 5 * 2**20


@pytest.mark.slow
def test_the_shipped_base_reproduces_its_recorded_score_with_eval_py(tmp_path):
    out = tmp_path / "score.json"
    ok(run_cli("eval.py", f"ckpt={finetune.base_path()}", "windows=run", f"output={out}", cwd=ROOT))
    assert abs(json.loads(out.read_text())["bits_per_char"] - recorded_score()) <= 1e-3


def test_the_base_model_files_are_package_data_of_the_installed_package():
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["charlstm"]
    package = ROOT / "src" / "charlstm"
    assert str(finetune.base_path().relative_to(package)) in listed
    assert all((package / name).is_file() for name in listed)


@pytest.mark.slow
def test_a_run_started_from_init_from_resumes_with_its_vocabulary_and_origin(base_ckpt, text_file, tmp_path):
    text = text_file("x = {'a': [1, 2]}  # new chars\n" * 80)
    shape = ["model.units=16", "model.embed_dim=8", "data.lowercase=false", "callbacks.text_sample=null"]
    run = tmp_path / "run"
    ok(run_cli("train.py", *SHRINK, *shape, "data=file", f"data.path={text}", f"init_from={base_ckpt}",
               "trainer.max_steps=3", "trainer.max_epochs=-1", f"hydra.run.dir={run}", cwd=tmp_path))  # fmt: skip
    ok(run_cli("train.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=6", cwd=tmp_path))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["hyper_parameters"]["init_from"] == str(base_ckpt.resolve())
    assert "{" in ckpt["hyper_parameters"]["vocab"] and set(ckpt["hyper_parameters"]["vocab"]) > set("ABC")
