"""Bad input said in one line, nothing trained on garbage: a damaged or stale prepared cache is prepared again, a
corpus that is not a regular file is refused before it is read, a checkpoint of NaN or inf weights is refused by
eval.py, generate.py and a resume."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from charlstm.app.train import train
from charlstm.core import checkpoint
from charlstm.core.errors import CheckpointError, CorpusError
from charlstm.core.vocab import CharVocab
from charlstm.data import prepared
from charlstm.data.prepared import prepare
from tests.cli import ROOT, SHRINK, cli_env, one_line_error, run_cli
from tests.conftest import TINY, compose_cfg

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs!\n" * 40


def expected(text: str) -> tuple[CharVocab, torch.Tensor]:
    text = text.lower()
    vocab = CharVocab.from_text(text)
    return vocab, vocab.encode(text)


def assert_prepared_right(prepared, text: str = TEXT) -> None:
    vocab, ids = expected(text)
    assert prepared.vocab == vocab and torch.equal(prepared.ids.long(), ids)


@pytest.fixture
def corpus(tmp_path: Path):
    """A text file and its prepared cache: (path, data_dir, cache folder)."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    prepared = prepare(path, tmp_path / "data")
    folder = prepared.folder
    del prepared  # unmapped, so the test may write the files
    return path, tmp_path / "data", folder


def damaged_line(caplog, folder: Path, name: str) -> None:
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [f"the prepared corpus in {folder} is damaged ({name} does not match its checksum): preparing "
                     "it again"]  # fmt: skip


# -- the prepared cache ---------------------------------------------------------------------------------------


def test_ids_overwritten_with_random_bytes_of_the_same_size_are_prepared_again(corpus, caplog):
    path, data_dir, folder = corpus
    ids = folder / "ids.u8"
    ids.write_bytes(os.urandom(ids.stat().st_size))
    with caplog.at_level(logging.WARNING, logger="charlstm.data.prepared"):
        assert_prepared_right(prepare(path, data_dir))
    damaged_line(caplog, folder, "ids.u8")


def test_ids_overwritten_with_random_valid_ids_are_prepared_again(corpus, caplog):
    path, data_dir, folder = corpus
    ids = folder / "ids.u8"
    n_vocab = len(json.loads((folder / "vocab.json").read_text()))
    rng = np.random.default_rng(0)
    ids.write_bytes(rng.integers(0, n_vocab, ids.stat().st_size, dtype=np.uint8).tobytes())
    with caplog.at_level(logging.WARNING, logger="charlstm.data.prepared"):
        assert_prepared_right(prepare(path, data_dir))
    damaged_line(caplog, folder, "ids.u8")


def test_two_chars_swapped_in_the_vocabulary_are_prepared_again(corpus, caplog):
    path, data_dir, folder = corpus
    chars = json.loads((folder / "vocab.json").read_text())
    chars[3], chars[7] = chars[7], chars[3]
    (folder / "vocab.json").write_text(json.dumps(chars, ensure_ascii=False))
    with caplog.at_level(logging.WARNING, logger="charlstm.data.prepared"):
        assert_prepared_right(prepare(path, data_dir))
    damaged_line(caplog, folder, "vocab.json")


def test_a_cache_folder_replaced_by_a_file_is_prepared_again(corpus):
    path, data_dir, folder = corpus
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    prepared = prepare(path, data_dir)
    assert prepared.folder == folder and folder.is_dir()
    assert_prepared_right(prepared)


def test_a_prepared_folder_that_is_a_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").write_text("oops")
    with pytest.raises(CorpusError) as info:
        prepare(path, tmp_path / "data")
    assert str(info.value) == (
        f"{tmp_path / 'data' / 'prepared'} is not a folder (prepared corpora go there); remove it or set "
        "paths.data_dir to another folder"
    )


def test_a_source_edited_in_place_with_its_size_and_time_restored_is_prepared_again(corpus):
    path, data_dir, folder = corpus
    st = path.stat()
    edited = TEXT.replace("fox", "cat")
    assert len(edited) == len(TEXT)
    path.write_text(edited)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    prepared = prepare(path, data_dir)
    assert prepared.folder != folder
    assert_prepared_right(prepared, edited)


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files hashed from now on."""
    names: list[str] = []
    real = prepared.file_hash

    def counting(path: Path) -> str:
        names.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(prepared, "file_hash", counting)
    return names


def test_an_unchanged_source_and_cache_are_not_read_again(corpus, hashed):
    path, data_dir, folder = corpus
    again = prepare(path, data_dir, after_chunk=lambda i: pytest.fail("the cache should have been used"))
    assert again.folder == folder and hashed == []
    assert_prepared_right(again)


def test_a_source_touched_without_a_change_is_hashed_once_and_its_cache_kept(corpus, hashed):
    path, data_dir, folder = corpus
    os.utime(path)
    kept = lambda i: pytest.fail("the cache should have been used")  # noqa: E731
    assert prepare(path, data_dir, after_chunk=kept).folder == folder and hashed == ["corpus.txt"]
    assert prepare(path, data_dir, after_chunk=kept).folder == folder and hashed == ["corpus.txt"]


def test_a_copied_data_folder_is_checked_once_then_not_again(corpus, hashed, tmp_path):
    path, data_dir, folder = corpus
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)  # the same times, other inodes and ctimes
    kept = lambda i: pytest.fail("the copied cache should have been used")  # noqa: E731
    first = prepare(path, copy, after_chunk=kept)
    assert first.folder == copy / "prepared" / folder.name and sorted(hashed) == ["ids.u8", "vocab.json"]
    assert_prepared_right(first)
    del first
    hashed.clear()
    assert prepare(path, copy, after_chunk=kept).folder == copy / "prepared" / folder.name and hashed == []
    (copy / "prepared" / folder.name / "ids.u8").write_bytes(b"\x00" * len(TEXT))  # still checked after that
    assert_prepared_right(prepare(path, copy))


def test_a_damaged_cache_trains_on_the_text_itself(tmp_path, data_dir):
    """The command as users run it: the damaged ids are noticed, prepared again, and training sees the text."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    args = [*SHRINK, "data=file", f"data.path={path}", f"paths.data_dir={tmp_path / 'data'}", "trainer.max_steps=2",
            f"hydra.run.dir={tmp_path / 'run'}", "sample.length=0"]  # fmt: skip
    first = run_cli("train.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    [ids] = (tmp_path / "data" / "prepared").glob("*/ids.u8")
    data = bytearray(ids.read_bytes())
    random.Random(0).shuffle(data)  # the same bytes, so the same size and the same vocabulary, in another order
    ids.write_bytes(bytes(data))
    shutil.rmtree(tmp_path / "run")
    again = run_cli("train.py", *args, cwd=tmp_path)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"the prepared corpus in {ids.parent} is damaged (ids.u8 does not match its checksum)" in again.stdout
    assert_prepared_right(prepare(path, tmp_path / "data"))


# -- corpora that are not regular files -------------------------------------------------------------------------


def test_dev_zero_is_refused_in_one_line(tmp_path):
    done = run_cli("train.py", *SHRINK, "data=file", "data.path=/dev/zero", f"paths.data_dir={tmp_path}",
                   cwd=tmp_path, timeout=60)  # fmt: skip
    assert one_line_error(done) == (
        "error: corpus path /dev/zero is a device, not a regular file (a corpus is read twice while it is "
        "prepared); save the text to a file and set data.path to it"
    )


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    done = run_cli("train.py", *SHRINK, "data=file", f"data.path={fifo}", f"paths.data_dir={tmp_path}",
                   cwd=tmp_path, timeout=60)  # fmt: skip
    assert one_line_error(done).startswith(f"error: corpus path {fifo} is a named pipe, not a regular file")


def test_process_substitution_is_refused_as_a_pipe(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    command = (f"{sys.executable} {ROOT / 'train.py'} {' '.join(SHRINK)} data=file data.path=<(cat {text}) "
               f"paths.data_dir={tmp_path}")  # fmt: skip
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    line = one_line_error(done)
    assert " is a named pipe, not a regular file" in line and "changed while" not in line


# -- checkpoints of NaN or inf weights ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    """A tiny run's last.ckpt, and copies of it whose weights hold NaN and inf."""
    root = tmp_path_factory.mktemp("nan_ckpt")
    cfg = compose_cfg("train", [*TINY, "trainer.max_steps=3", "sample.length=0", "callbacks.text_sample=null"])
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.outputs_root, cfg.paths.data_dir = str(root / "run"), str(root), str(data_dir)
    train(cfg)
    good = root / "run" / "checkpoints" / "last.ckpt"
    out = {"good": good, "root": root}
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        ckpt = torch.load(good, weights_only=True)
        ckpt["state_dict"]["net.head.weight"][0, 0] = value
        out[name] = root / "run" / "checkpoints" / f"{name}.ckpt"
        torch.save(ckpt, out[name])
    return out


def nan_line(path: Path) -> str:
    return (
        f"error: checkpoint {path} has non-finite weights (net.head.weight holds NaN or inf): the training that "
        "wrote it had diverged; use an earlier checkpoint, e.g. the best-*.ckpt beside it"
    )


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nan_or_inf_weights_are_refused_by_load_and_a_good_checkpoint_is_not(poisoned, kind):
    checkpoint.load(poisoned["good"])
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(poisoned[kind])
    assert f"error: {info.value}" == nan_line(poisoned[kind])


def test_eval_refuses_nan_weights_in_one_line(poisoned, tmp_path):
    done = run_cli("eval.py", f"ckpt={poisoned['nan']}", cwd=tmp_path)
    assert one_line_error(done) == nan_line(poisoned["nan"])


def test_generate_refuses_nan_weights_in_one_line(poisoned, tmp_path):
    done = run_cli("generate.py", f"ckpt={poisoned['inf']}", "length=20", cwd=tmp_path)
    assert one_line_error(done) == nan_line(poisoned["inf"])
    assert done.stdout == ""


def test_a_resume_refuses_nan_weights_in_one_line(poisoned, tmp_path):
    done = run_cli("train.py", f"ckpt_path={poisoned['nan']}", "trainer.max_steps=6", cwd=tmp_path)
    assert one_line_error(done) == nan_line(poisoned["nan"])


def test_eval_of_blown_up_but_finite_weights_is_a_score_not_a_traceback(poisoned, tmp_path):
    ckpt = torch.load(poisoned["good"], weights_only=True)
    for name, value in ckpt["state_dict"].items():
        if name.startswith("net.") and value.is_floating_point():
            value.mul_(1e30)
    huge = poisoned["good"].with_name("huge.ckpt")
    torch.save(ckpt, huge)
    done = run_cli("eval.py", f"ckpt={huge}", "output=score.json", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    score = json.loads((tmp_path / "score.json").read_text())
    assert score["bits_per_char"] > 100 and score["perplexity"] == float("inf")
