"""eval.py: a checkpoint's bits/char on its own validation text equals the run's own val/bpc; any text too."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from charlstm.app.evaluate import dataset_batches, evaluate
from charlstm.app.train import train
from charlstm.core.errors import ConfigError, VocabError
from charlstm.data.windows import WindowDataset
from tests import forkserver
from tests.cli import into_closed_pipe
from tests.conftest import ROOT, TINY, compose_cfg

# The run's validation context differs from its seq_len, so a test fails if eval reads the wrong one.
# The run validates in fp32 like eval.py scores, so the two agree to float rounding (with precision auto a
# bf16-mixed run's own validation differs from eval.py's fp32 score in the 4th decimal).
RUN = [*TINY, "trainer.precision=32-true",
       "data.seq_len=30", "data.val_context=20", "data.val_max_windows=null", "trainer.max_epochs=2",
       "callbacks.text_sample=null", "trainer.enable_progress_bar=false", "sample.length=0"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """One tiny run: its last.ckpt, the val/bpc its last validation logged, and its validation text."""
    root = tmp_path_factory.mktemp("eval_run")
    cfg = compose_cfg("train", RUN)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
        cfg.paths.outputs_root = str(root)
        cfg.paths.data_dir = str(data_dir)
    metrics, objects = train(cfg)
    dm = objects.datamodule
    return {
        "ckpt": root / "run" / "checkpoints" / "last.ckpt",
        "val_bpc": metrics["val/bpc"],
        "val_text": dm.vocab.decode(dm.val_ids),
        "root": root,
    }


_DATA_DIR: list[Path] = []


@pytest.fixture(autouse=True)
def _session_data_dir(data_dir: Path):
    """Texts named with data= are prepared into the session's data folder, not the repository's data/."""
    _DATA_DIR[:] = [data_dir]


def eval_cfg(*overrides: str):
    if any(o.startswith("data=") for o in overrides):
        overrides = (*overrides, f"data.data_dir={_DATA_DIR[0]}")
    return compose_cfg("eval", list(overrides))


def test_a_texts_batches_predict_every_char_from_the_chars_before_it():
    ids = torch.arange(100, 111, dtype=torch.uint8)
    batches = list(dataset_batches(WindowDataset(ids, 3), 4))  # how eval.py reads a text (data=...)
    assert [len(y) for _, y in batches] == [4, 4]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert y.tolist() == list(range(103, 111)) and y.dtype == torch.long
    assert x.tolist() == [[t - 3, t - 2, t - 1] for t in range(103, 111)]
    # a dataset without batch gathering gives the same batches item by item
    plain = [(row, target) for row, target in zip(x, y, strict=True)]
    again = list(dataset_batches(plain, 4))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, batches, strict=True))


def test_own_validation_text_matches_the_runs_val_bpc(trained):
    score = evaluate(eval_cfg(f"ckpt={trained['ckpt']}"))
    assert score.context == 20
    assert score.chars == len(trained["val_text"]) - 20
    assert abs(score.bits_per_char - trained["val_bpc"]) < 1e-4
    assert math.isclose(score.nats_per_char, score.bits_per_char * math.log(2), rel_tol=1e-9)
    assert math.isclose(score.perplexity, math.exp(score.nats_per_char), rel_tol=1e-9)


def test_windows_run_reproduces_a_subsampled_validation(make_cfg, tmp_path):
    metrics, objects = train(make_cfg(*RUN[len(TINY) :], "data.val_max_windows=40"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    same = evaluate(eval_cfg(f"ckpt={ckpt}", "windows=run"))
    assert abs(same.bits_per_char - metrics["val/bpc"]) < 1e-4
    assert same.chars == len(objects.datamodule.val_dataset()) <= 40
    every = evaluate(eval_cfg(f"ckpt={ckpt}"))
    assert every.chars == len(objects.datamodule.val_ids) - 20 > same.chars


def test_ckpt_last_finds_the_newest_run(trained):
    score = evaluate(eval_cfg("ckpt=last", f"outputs_root={trained['root']}"))
    assert abs(score.bits_per_char - trained["val_bpc"]) < 1e-4


def test_any_text_scores_every_char_from_the_context_before_it(trained, text_file):
    path = text_file(trained["val_text"], "val.txt")
    score = evaluate(eval_cfg(f"ckpt={trained['ckpt']}", "data=file", f"data.path={path}", "data.val_context=20"))
    assert score.chars == len(trained["val_text"]) - 20 and score.skipped == 0
    assert abs(score.bits_per_char - trained["val_bpc"]) < 1e-4
    # another context scores other windows: a different number
    other = evaluate(eval_cfg(f"ckpt={trained['ckpt']}", "data=file", f"data.path={path}", "data.val_context=5"))
    assert other.chars == len(trained["val_text"]) - 5
    assert abs(other.bits_per_char - score.bits_per_char) > 1e-4


def test_text_is_lowercased_like_the_checkpoint(trained, text_file):
    path = text_file(trained["val_text"].upper(), "upper.txt")
    score = evaluate(eval_cfg(f"ckpt={trained['ckpt']}", "data=file", f"data.path={path}", "data.val_context=20"))
    assert abs(score.bits_per_char - trained["val_bpc"]) < 1e-4


def test_unknown_chars_are_an_error_listing_them_or_skipped_and_counted(trained, text_file):
    text = trained["val_text"]
    dirty = text[:40] + "☃" + text[40:90] + "¶☃" + text[90:] + "€"
    path = text_file(dirty, "dirty.txt")
    base = [f"ckpt={trained['ckpt']}", "data=file", f"data.path={path}", "data.val_context=20"]
    with pytest.raises(VocabError) as err:
        evaluate(eval_cfg(*base))
    message = str(err.value)
    assert "\n" not in message and "unknown=skip" in message
    assert all(repr(c) in message for c in "☃¶€")
    score = evaluate(eval_cfg(*base, "unknown=skip"))
    assert score.skipped == 4
    assert score.chars == len(text) - 20
    assert abs(score.bits_per_char - trained["val_bpc"]) < 1e-4  # the skipped text is the clean text


def test_a_text_is_scored_from_the_prepared_cache_as_the_vocabulary_encodes_it(trained, text_file, data_dir):
    # chars the model lacks, CRLF line ends, max_chars cutting the text: the ids encoding the lowercased text gives
    # (chunk boundaries of the preparation itself are tested in test_prepared.py)
    from charlstm.app.evaluate import read_text
    from charlstm.core.vocab import CharVocab

    hp = torch.load(trained["ckpt"], weights_only=True, map_location="cpu")["hyper_parameters"]
    text = (trained["val_text"] + "☃É\r\n¶") * 40
    path = text_file(text, "many.txt")
    lowered = text.replace("\r\n", "\n").lower()
    for max_chars in (None, 3000, len(lowered) - 7):
        cut = f"data.max_chars={max_chars or 'null'}"
        cfg = eval_cfg(f"ckpt={trained['ckpt']}", "data=file", f"data.path={path}", cut)
        ids, skipped, where = read_text(cfg.data, hp, "skip")
        head = lowered[:max_chars] if max_chars else lowered
        expected = CharVocab.from_list(hp["vocab"]).encode(head, unknown="skip")
        assert ids.long().tolist() == expected.tolist() and skipped == len(head) - len(expected) > 0
        assert where == str(path)
    assert list((data_dir / "prepared").glob("many-*/ids.*"))  # prepared once, beside the training caches
    with pytest.raises(VocabError, match="'☃'"):
        read_text(cfg.data, hp, "error")


def test_output_writes_the_score_as_json(trained, tmp_path):
    out = tmp_path / "scores" / "eval.json"
    score = evaluate(eval_cfg(f"ckpt={trained['ckpt']}", f"output={out}"))
    saved = json.loads(out.read_text())
    assert saved["bits_per_char"] == score.bits_per_char
    assert saved["nats_per_char"] == score.nats_per_char
    assert saved["perplexity"] == score.perplexity
    assert saved["chars"] == score.chars == len(trained["val_text"]) - 20
    assert saved["skipped"] == 0 and saved["context"] == 20


def test_checkpoint_without_run_folder_needs_data(trained, tmp_path):
    lone = tmp_path / "lone.ckpt"
    shutil.copy(trained["ckpt"], lone)
    with pytest.raises(ConfigError, match=r"pass data=file data\.path=X"):
        evaluate(eval_cfg(f"ckpt={lone}"))


@pytest.mark.parametrize(
    ("override", "key"),
    [("unknown=drop", "unknown"), ("device=tpu", "device"), ("batch_size=0", "batch_size"), ("windows=a", "windows")],
)
def test_bad_settings_name_the_key(trained, override, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        evaluate(eval_cfg(f"ckpt={trained['ckpt']}", override))


def test_too_short_text_is_one_line(trained, text_file):
    path = text_file("abc", "short.txt")
    with pytest.raises(Exception, match="too few") as err:
        evaluate(eval_cfg(f"ckpt={trained['ckpt']}", "data=file", f"data.path={path}"))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_eval_py_prints_one_line_and_errors_in_one_line(trained, text_file):
    cmd = [sys.executable, str(ROOT / "eval.py"), f"ckpt={trained['ckpt']}"]
    proc = forkserver.run(cmd, ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bits/char ")
    assert abs(float(lines[0].split()[1]) - trained["val_bpc"]) < 1e-4
    assert f"chars scored {len(trained['val_text']) - 20}" in lines[0]

    path = text_file("some text ☃", "bad.txt")
    proc = forkserver.run([*cmd, "data=file", f"data.path={path}", f"data.data_dir={path.parent}"], ROOT, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "'☃'" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_py_into_a_reader_that_went_away_ends_quietly(trained):
    """`python eval.py ckpt=X | head -1` after head is done: exit status 141, as a Unix tool, and no traceback."""
    done = into_closed_pipe([sys.executable, str(ROOT / "eval.py"), f"ckpt={trained['ckpt']}"], trained["root"])
    assert done.returncode == 128 + signal.SIGPIPE, done.stderr
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr, done.stderr
