"""Prepared corpora: a file read in chunks into an id cache under data/prepared/, identical to encoding the whole
text at once, rebuilt when the source changes, never trusted half-written, built once by concurrent runs, and
memory-mapped by the DataModule."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from charlstm.core.errors import CorpusError, VocabError
from charlstm.core.vocab import CharVocab
from charlstm.data.prepared import iter_text, prepare
from charlstm.training.datamodule import CharDataModule

# Multi-byte chars of 2, 3 and 4 bytes, CRLF pairs and lone CRs, a BOM, Greek capitals whose lowercase depends on
# the next char (final sigma), a char that lowercases to two ('İ'), tabs and trailing text without a newline.
TEXT = (
    "\ufeffThe Tragedy of MACBETH\r\nÉté à l'aube — «ça va?»\r\n\r\n日本語のテキスト、漢字。\r\n"
    "emoji 😀🎭 and \r lone CR\r\nΟΔΟΣ ΟΔΟΣ. Σ\r\nİstanbul\tTAB\r\n" * 7 + "end without newline"
)
DATA = TEXT.encode("utf-8")


def expected_ids(data: bytes, lowercase: bool, errors: str = "strict") -> tuple[CharVocab, torch.Tensor]:
    """What decoding the whole file at once gives: UTF-8 without its BOM, CRLF as LF (the reference)."""
    text = data.decode("utf-8", errors=errors).removeprefix("\ufeff").replace("\r\n", "\n")
    if lowercase:
        text = text.lower()
    vocab = CharVocab.from_text(text)
    return vocab, vocab.encode(text)


def boundaries(data: bytes, chunk: int) -> tuple[bool, bool]:
    """Whether some chunk boundary splits a multi-byte char, and whether one splits a CRLF pair."""
    cuts = range(chunk, len(data), chunk)
    return (any(0x80 <= data[i] <= 0xBF for i in cuts), any(data[i - 1 : i + 1] == b"\r\n" for i in cuts))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 13, 64, 4096])
@pytest.mark.parametrize("lowercase", [True, False])
def test_prepared_ids_equal_encoding_the_whole_text(tmp_path, chunk, lowercase):
    assert boundaries(DATA, chunk) == (True, True) or chunk > len(DATA)
    path = tmp_path / "corpus.txt"
    path.write_bytes(DATA)
    prepared = prepare(path, tmp_path / "data", lowercase=lowercase, chunk_bytes=chunk)
    vocab, ids = expected_ids(DATA, lowercase)
    assert prepared.vocab == vocab
    assert prepared.ids.dtype == vocab.id_dtype and torch.equal(prepared.ids.long(), ids)
    assert "".join(piece for piece, _ in iter_text(path, "corpus", lowercase=lowercase, chunk_bytes=chunk)) == (
        vocab.decode(ids)
    )


def test_a_wide_vocabulary_is_stored_in_two_bytes(tmp_path):
    text = "".join(chr(0x4E00 + (i * 7919) % 3000) for i in range(20_000)) + "\r\n"
    path = tmp_path / "cjk.txt"
    path.write_bytes(text.encode("utf-8"))
    prepared = prepare(path, tmp_path / "data", chunk_bytes=1000)
    vocab, ids = expected_ids(path.read_bytes(), True)
    assert prepared.vocab == vocab and len(vocab) == 3001
    assert prepared.ids.dtype == torch.int16 and torch.equal(prepared.ids.long(), ids)
    assert (prepared.folder / "ids.u16").stat().st_size == 2 * len(ids)


def test_ascii_text_in_one_byte_per_char(tmp_path):
    path = tmp_path / "code.txt"
    path.write_bytes(b"def f(x):\r\n    return X + 1  # Sum\n" * 50)
    prepared = prepare(path, tmp_path / "data", chunk_bytes=16)
    vocab, ids = expected_ids(path.read_bytes(), True)
    assert prepared.vocab == vocab and torch.equal(prepared.ids.long(), ids)
    assert (prepared.folder / "ids.u8").stat().st_size == len(ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 1000])
def test_an_undecodable_byte_is_named_by_its_offset_in_the_file(tmp_path, chunk):
    head = "naïve 日本 ".encode()
    path = tmp_path / "bad.txt"
    path.write_bytes(head + b"\xe6\x97" + b"!" + b" more text" * 3)  # a 3-byte char cut short at offset len(head)
    with pytest.raises(CorpusError) as info:
        prepare(path, tmp_path / "data", where=f"corpus file {path}", chunk_bytes=chunk)
    assert str(info.value) == (
        f"corpus file {path} is not valid UTF-8: byte 0xe6 at offset {len(head)} cannot be decoded; "
        "convert the file to UTF-8 or set data.errors=replace"
    )
    assert not [p for p in (tmp_path / "data" / "prepared").iterdir() if p.is_dir()]


@pytest.mark.parametrize("chunk", [1, 2, 3, 1000])
def test_replace_gives_the_same_text_as_decoding_at_once(tmp_path, chunk):
    data = "ab日".encode() + b"\xff\xe6\x97" + b"cd\r\n" + b"\xf0\x9f"  # bad bytes, a cut char at the end
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    prepared = prepare(path, tmp_path / "data", errors="replace", chunk_bytes=chunk)
    vocab, ids = expected_ids(data, True, errors="replace")
    assert prepared.vocab == vocab and torch.equal(prepared.ids.long(), ids) and "\ufffd" in vocab.chars


def test_the_cache_is_used_and_a_changed_source_rebuilds_it(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first version of the text\n" * 20)
    first = prepare(path, tmp_path / "data")
    assert json.loads((first.folder / "meta.json").read_text())["chars"] == 520
    again = prepare(path, tmp_path / "data", after_chunk=lambda i: pytest.fail("the cache should have been used"))
    assert again.folder == first.folder
    path.write_bytes(b"A SECOND, longer version of the text!\n" * 20)
    second = prepare(path, tmp_path / "data")
    vocab, ids = expected_ids(path.read_bytes(), True)
    assert second.folder != first.folder and second.vocab == vocab and torch.equal(second.ids.long(), ids)
    assert not first.folder.exists()  # the cache of the old text is gone, the new one alone remains
    # other settings are another cache of the same file, kept side by side
    upper = prepare(path, tmp_path / "data", lowercase=False)
    assert upper.folder != second.folder and second.folder.exists() and "A" in upper.vocab.chars


def test_a_failed_preparation_leaves_nothing_and_a_later_run_builds_it(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(DATA)

    def crash(i):
        if i == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        prepare(path, tmp_path / "data", chunk_bytes=64, after_chunk=crash)
    root = tmp_path / "data" / "prepared"
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    prepared = prepare(path, tmp_path / "data", chunk_bytes=64)
    assert torch.equal(prepared.ids.long(), expected_ids(DATA, True)[1])


def test_leftovers_of_a_killed_preparation_are_never_trusted(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(DATA)
    good = prepare(path, tmp_path / "data")
    root, name = good.folder.parent, good.folder.name
    # what kill -9 can leave: a temporary folder (even with a meta.json), and a cache whose ids file is short
    leftover = root / f".{name.rsplit('-', 1)[0]}-abc123.tmp"
    leftover.mkdir()
    (leftover / "ids.u8").write_bytes(b"\x00" * 10)
    (leftover / "meta.json").write_text((good.folder / "meta.json").read_text())
    ids_file = good.folder / "ids.u8"
    del good
    ids_file.write_bytes(ids_file.read_bytes()[:-5])
    rebuilt = prepare(path, tmp_path / "data")
    assert torch.equal(rebuilt.ids.long(), expected_ids(DATA, True)[1])
    assert not leftover.exists()
    group = name.rsplit("-", 1)[0]
    assert sorted(p.name for p in root.iterdir()) == sorted([name, f".{group}.lock", f".{group}.source.json"])


PREPARER = textwrap.dedent(
    """
    import sys, time
    from charlstm.data.prepared import prepare
    path, data_dir, tag, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

    def slowly(i):
        if i == 0:
            print(f"building {tag}", flush=True)
        time.sleep(delay)

    prepared = prepare(path, data_dir, chunk_bytes=256, after_chunk=slowly)
    print(f"done {tag} {prepared.folder} {len(prepared.ids)}", flush=True)
    """
)


def _preparer(path: Path, data_dir: Path, tag: str, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PREPARER, str(path), str(data_dir), tag, str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_two_processes_preparing_the_same_file_build_it_once(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(DATA * 4)
    procs = [_preparer(path, tmp_path / "data", tag, 0.02) for tag in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    lines = [line for out, _ in outs for line in out.splitlines()]
    assert len([line for line in lines if line.startswith("building")]) == 1  # the other waited for the lock
    done = [line.split()[2:] for line in lines if line.startswith("done")]
    assert len(done) == 2 and done[0] == done[1]
    prepared = prepare(path, tmp_path / "data", after_chunk=lambda i: pytest.fail("should be cached"))
    assert str(prepared.folder) == done[0][0] and torch.equal(prepared.ids.long(), expected_ids(DATA * 4, True)[1])


def test_a_preparation_killed_with_sigkill_leaves_no_trusted_cache(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(DATA * 4)
    proc = _preparer(path, tmp_path / "data", "killed", 0.5)
    assert proc.stdout.readline().startswith("building")
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    root = tmp_path / "data" / "prepared"
    assert [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] == []
    prepared = prepare(path, tmp_path / "data")
    assert torch.equal(prepared.ids.long(), expected_ids(DATA * 4, True)[1])
    assert [p.name for p in root.iterdir() if p.is_dir()] == [prepared.folder.name]  # the leftover was cleared


def test_prepared_files_keep_the_users_umask(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(DATA)
    old = os.umask(0o027)
    try:
        prepared = prepare(path, tmp_path / "data")
    finally:
        os.umask(old)
    assert stat.S_IMODE(prepared.folder.stat().st_mode) == 0o750
    for p in prepared.folder.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p


# -- the DataModule on the prepared path ----------------------------------------------------------------------


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (Linux /proc)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_training_and_validation_ids_are_memory_mapped(tmp_path, text_file):
    path = text_file(TEXT * 20)
    dm = CharDataModule(source="file", path=str(path), data_dir=str(tmp_path / "data"), seq_len=10)
    dm.load()
    (ids_file,) = (tmp_path / "data" / "prepared").glob("*/ids.*")
    ranges = mapped_ranges(ids_file)
    for part in (dm.train_ids, dm.val_ids):
        assert any(lo <= part.data_ptr() < hi for lo, hi in ranges)  # a view of the map, not a copy
    vocab, ids = expected_ids((TEXT * 20).encode(), True)
    assert dm.vocab == vocab and torch.equal(torch.cat([dm.train_ids, dm.val_ids]).long(), ids)


def test_max_chars_keeps_the_vocabulary_of_the_slice(tmp_path, text_file):
    path = text_file("abc" * 100 + "xyz" * 100)
    dm = CharDataModule(source="file", path=str(path), data_dir=str(tmp_path / "data"), seq_len=5, max_chars=200)
    dm.load()
    assert dm.vocab.chars == ["a", "b", "c"] and len(dm.train_ids) + len(dm.val_ids) == 200
    assert dm.vocab.decode(dm.train_ids.long())[:6] == "abcabc"


def test_a_fixed_vocabulary_renumbers_the_ids_and_names_what_it_lacks(tmp_path, text_file):
    path = text_file("cab" * 100)
    chars = ["x", "c", "b", "a"]
    dm = CharDataModule(source="file", path=str(path), data_dir=str(tmp_path / "data"), seq_len=5, vocab=chars)
    dm.load()
    assert dm.vocab.chars == chars and dm.train_ids[:3].tolist() == [1, 3, 2]
    short = CharDataModule(source="file", path=str(path), data_dir=str(tmp_path / "data"), seq_len=5,
                           vocab=["a", "b"])  # fmt: skip
    with pytest.raises(VocabError) as info:
        short.load()
    assert str(info.value) == (
        "the corpus has 1 character(s) data.vocab lacks: 'c'; add them to data.vocab, or train on a text without them"
    )
