"""Checkpoints load safely: a pickle that would run code is refused without running it, broken and foreign files
are one-line errors, and a good checkpoint alone rebuilds the network."""

from __future__ import annotations

import os
import pickle
import time
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from charlstm.core import checkpoint
from charlstm.core.errors import CheckpointError
from charlstm.training.model import CharLSTMModule

VOCAB = list("\n abcdefghij")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, CharLSTMModule]:
    """A real Lightning checkpoint of a tiny CharLSTMModule after one optimizer step."""
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    module = CharLSTMModule(VOCAB, encoding="embedding", units=8, layers=2, embed_dim=4, seq_len=6)
    x = torch.randint(len(VOCAB), (8, 6))
    y = torch.randint(len(VOCAB), (8,))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no validation data: one training step is all a checkpoint needs here
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    path = tmp / "good.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def refusal(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert "\n" not in message and message
    return message


class RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_good_checkpoint_rebuilds_the_network(good):
    path, module = good
    ckpt = checkpoint.load(path)
    net = checkpoint.build_net(ckpt, path)
    assert not net.training
    x = torch.randint(len(VOCAB), (3, 6))
    module.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], module.net(x)[0])


@pytest.mark.parametrize("evil", [RunsCode, RunsShell])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, good, evil):
    marker = tmp_path / "ran"
    real = torch.load(good[0], weights_only=True)
    real["hyper_parameters"]["vocab"] = evil(marker)  # a real checkpoint with one poisoned entry
    torch.save(real, tmp_path / "evil.ckpt")
    message = refusal(tmp_path / "evil.ckpt")
    assert message.startswith(f"checkpoint {tmp_path / 'evil.ckpt'} was refused: loading it would call ")
    assert message.endswith("and a safe load runs nothing; load only checkpoints written by charlstm")
    assert not marker.exists()
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"state_dict": evil(marker)}, protocol=2))
    assert "was refused: loading it would call" in refusal(tmp_path / "raw.pkl")
    assert not marker.exists()
    # the same files really would run code when loaded unsafely: the test proves the refusal, not a dud
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


def test_broken_files_are_one_line_errors(tmp_path, good):
    data = good[0].read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert refusal(tmp_path / "empty.ckpt") == (
        f"checkpoint {tmp_path / 'empty.ckpt'} is empty or truncated; use another checkpoint"
    )
    for name, content in [
        ("half.ckpt", data[: len(data) // 2]),
        ("tail.ckpt", data[:-40]),
        ("scrambled.ckpt", data[:2000] + os.urandom(3000) + data[5000:]),
    ]:
        (tmp_path / name).write_bytes(content)
        message = refusal(tmp_path / name)
        assert message.startswith(f"checkpoint {tmp_path / name} is ") and "truncated or corrupt" in message, message
    for name, content in [("noise.ckpt", os.urandom(4000)), ("notes.ckpt", b"just some text\n")]:
        (tmp_path / name).write_bytes(content)
        message = refusal(tmp_path / name)
        assert message.startswith(f"{tmp_path / name} is not a charlstm checkpoint"), message
        assert message.endswith("pass a .ckpt file written by charlstm")


def test_foreign_checkpoints_are_refused(tmp_path, good):
    for name, obj in [
        ("tensor.ckpt", torch.zeros(3)),
        ("dict.ckpt", {"state_dict": {}, "epoch": 1}),
        ("other.ckpt", {"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}),
    ]:
        torch.save(obj, tmp_path / name)
        assert refusal(tmp_path / name) == (
            f"{tmp_path / name} is not a charlstm checkpoint (no vocabulary or model sizes in it)"
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["hyper_parameters"].update(vocab=["ab"]), "its vocabulary is not a list of single characters"),
        (lambda c: c["hyper_parameters"].update(vocab=["a", "a"]), "its vocabulary lists a character twice"),
        (lambda c: c["hyper_parameters"].update(encoding="morse"), "encoding='morse' is unknown"),
        (lambda c: c["hyper_parameters"].update(units=0), "units=0 is not a positive integer"),
    ],
)
def test_damaged_hyperparameters_are_refused(tmp_path, good, change, message):
    ckpt = torch.load(good[0], weights_only=True)
    change(ckpt)
    with pytest.raises(CheckpointError) as info:
        checkpoint.build_net(ckpt, "x.ckpt")
    assert str(info.value) == f"x.ckpt is not a usable charlstm checkpoint: {message}"


def test_weights_that_do_not_fit_the_sizes_are_refused(good):
    ckpt = torch.load(good[0], weights_only=True)
    ckpt["hyper_parameters"]["units"] = 9
    with pytest.raises(CheckpointError) as info:
        checkpoint.build_net(ckpt, "x.ckpt")
    assert str(info.value).startswith("x.ckpt: its weights do not fit the model its hyperparameters describe (")
    assert "\n" not in str(info.value)


def test_resolve_and_find_last(tmp_path, good):
    with pytest.raises(CheckpointError, match=r"does not exist; pass ckpt=PATH to a \.ckpt file or ckpt=last$"):
        checkpoint.resolve(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match=r"is a directory; pass the \.ckpt file inside it$"):
        checkpoint.resolve(tmp_path)
    with pytest.raises(CheckpointError, match=r"^no last\.ckpt under .*; train a model first"):
        checkpoint.resolve("last", tmp_path)
    old, new = tmp_path / "a" / "checkpoints" / "last.ckpt", tmp_path / "b" / "checkpoints" / "last.ckpt"
    for path in (new, old):
        path.parent.mkdir(parents=True)
        path.write_bytes(good[0].read_bytes())
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert checkpoint.resolve("last", tmp_path) == new
    assert checkpoint.resolve(str(old)) == old
