"""Corpora prepared once: a text file read in chunks into a cache of ids and its vocabulary under
``data_dir/prepared/``, which every later run (and every DDP rank) memory-maps instead of reading the text."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlstm.core.errors import CorpusError, StorageError, VocabError, storage_error, write_failure
from charlstm.core.fileio import atomic_write_text, file_mode, fsync_dir
from charlstm.core.vocab import CharVocab, char_list, codepoints, unknown_chars
from charlstm.data.corpus import corpus_file

log = logging.getLogger(__name__)

# Bump when the ids a text becomes change (decoding, line ends, lowercasing, the file layout): old caches are
# then prepared again instead of trusted.
PREPARE_VERSION = 2
CHUNK_BYTES = 8 << 20
# A chunk is cut after its last space or newline within this many chars, so lowercasing (Greek final sigma
# depends on the next char) and CRLF pairs see the same neighbours as in the whole text.
_HOLD = 4096
# file suffix -> (numpy dtype written, torch dtype mapped): ids below 2**15 read the same as int16, which torch
# can gather from (it cannot index uint16 tensors)
ID_FILES = {"u8": (np.uint8, torch.uint8), "u16": (np.uint16, torch.int16), "u32": (np.uint32, torch.int32)}
_SUFFIX = {torch.uint8: "u8", torch.int16: "u16", torch.int32: "u32"}


@dataclass
class PreparedCorpus:
    """A prepared corpus: ``ids`` is a 1-D tensor memory-mapped from ``folder`` (nothing read until used)."""

    folder: Path
    ids: torch.Tensor
    vocab: CharVocab
    meta: dict[str, Any]


# -- reading the text in chunks ---------------------------------------------------------------------------------


def iter_text(
    path: str | os.PathLike[str], where: str, errors: str = "strict", lowercase: bool = False,
    chunk_bytes: int = CHUNK_BYTES, digest: Any = None,
) -> Iterator[tuple[str, int]]:  # fmt: skip
    """The file's text in pieces, as ``(piece, bytes read so far)``, never the whole file at once; ``digest`` (a
    hashlib object), if given, is fed the bytes read.

    The same text as decoding the whole file: UTF-8 decoded incrementally (a multi-byte char split by a chunk
    boundary is joined), a leading BOM dropped, CRLF turned into LF (a pair split by a boundary too), optionally
    lowercased. An undecodable byte is an error naming its offset in the file unless ``errors='replace'``.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    pos, held, started = 0, "", False
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk_bytes)
            if digest is not None:
                digest.update(data)
            final = not data
            pending = len(decoder.getstate()[0])  # bytes of a split char kept from the previous chunk
            try:
                text = decoder.decode(data, final)
            except UnicodeDecodeError as err:
                offset = pos - pending + err.start
                raise CorpusError(
                    f"{where} is not valid UTF-8: byte 0x{err.object[err.start]:02x} at offset {offset} cannot be "
                    "decoded; convert the file to UTF-8 or set data.errors=replace"
                ) from None
            pos += len(data)
            if not started and text:
                text, started = text.removeprefix("\ufeff"), True
            text = held + text
            cut = len(text)
            if not final:
                start = max(0, len(text) - _HOLD)
                cut = max(text.rfind("\n", start), text.rfind(" ", start)) + 1
                if cut == 0 and len(text) >= _HOLD:
                    cut = len(text)  # no break in sight: cut anywhere (CRLF is still kept whole below)
                if text.endswith("\r") and cut == len(text):
                    cut -= 1  # its "\n" may open the next chunk
            piece, held = text[:cut], text[cut:]
            if "\r" in piece:
                piece = piece.replace("\r\n", "\n")
            if lowercase:
                piece = piece.lower()
            if piece:
                yield piece, pos
            if final:
                return


def _points(piece: str) -> np.ndarray:
    """Code points of a piece: its bytes for ASCII (uint8, no copy per char), else uint32."""
    return np.frombuffer(piece.encode("ascii"), np.uint8) if piece.isascii() else codepoints(piece)


# -- the cache folder -------------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:40] or "corpus"


def new_digest() -> Any:
    """The hash prepared corpora are checked with: SHA-256, which CPUs with SHA instructions run at ~0.6 GB/s a
    core here (BLAKE2b: 0.4 GB/s, MD5: 0.25 GB/s on the same file)."""
    return hashlib.sha256()


def file_hash(path: Path) -> str:
    """The hash of a file's content, read in chunks."""
    with open(path, "rb") as fh:
        return str(hashlib.file_digest(fh, new_digest).hexdigest())


def identity(path: Path) -> list[int]:
    """What tells a file's content unchanged without reading it: (device, inode, size, mtime, ctime). Any write,
    chmod, rename or utime sets ctime to the clock's time, and no call sets it back (only setting the system clock
    can forge it), unlike the mtime, which ``touch -d`` or ``os.utime`` restore."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _settled_identity(path: Path, clock_dir: Path) -> list[int] | None:
    """``path``'s identity, taken once the clock that stamps files (read off a file made in ``clock_dir`` just
    before) has moved past its ctime: a change within the same tick would keep the ctime. None where no file can
    be made there or the ctime lies in the future."""
    while True:
        try:
            with tempfile.TemporaryFile(dir=clock_dir) as fh:
                now = os.fstat(fh.fileno()).st_ctime_ns
        except OSError:
            return None
        found = identity(path)
        ctime = found[4]
        if ctime % 1_000_000_000 == 0:  # a filesystem keeping whole seconds (FAT: two)
            ctime += 2_000_000_000
        if ctime < now:
            return found
        if ctime > now + 3_000_000_000:
            return None
        time.sleep(0.002)


def _replace_json(path: Path, value: Any) -> None:
    """Rewrite ``path`` as JSON atomically where it can be: a cache that cannot be written is still used as is."""
    with contextlib.suppress(OSError, StorageError):
        atomic_write_text(path, json.dumps(value, ensure_ascii=False))


def _index(root: Path, group: str) -> Path:
    """Where the text's identity and the hash of its content are kept, so an unchanged text is not read again."""
    return root / f".{group}.source.json"


def _text_hash(path: Path, index: Path) -> str:
    """The hash of the text's content: the one ``index`` records for the file's identity if that is unchanged,
    else the file is hashed and the index rewritten (where it can be)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = json.loads(index.read_text(encoding="utf-8"))
        if known["identity"] == identity(path):
            return str(known["hash"])
    before = _settled_identity(path, index.parent)
    digest = file_hash(path)
    if before is not None and identity(path) == before:
        _replace_json(index, {"identity": before, "hash": digest})
    return digest


def text_sha256(path: str | os.PathLike[str], data_dir: str | os.PathLike[str], lowercase: bool, errors: str) -> str:
    """The SHA-256 of a text file's bytes, as preparing it under these settings found it: read from the prepared
    index while the file is as it was when last hashed (a run records its corpus by it without reading it again)."""
    root, group = cache_names(Path(path), data_dir, lowercase, errors)
    return _text_hash(Path(path), _index(root, group))


def cache_names(path: Path, data_dir: str | os.PathLike[str], lowercase: bool, errors: str) -> tuple[Path, str]:
    """Where caches go, and the group name of one source file under given settings (its cache folders are
    ``<group>-<fingerprint>``, its lock ``.<group>.lock``)."""
    settings = json.dumps({"version": PREPARE_VERSION, "source": str(path.resolve()), "lowercase": bool(lowercase),
                           "errors": errors}, sort_keys=True)  # fmt: skip
    group = f"{_stem(path)}-{_sha(settings)[:12]}"
    return Path(data_dir) / "prepared", group


def _verify(path: Path, digest: str, recorded: Any) -> tuple[bool, list[int] | None]:
    """Whether ``path`` holds the content that hashed to ``digest``, and the identity to record for it: a file
    whose identity is the one recorded (see ``identity``) is not read at all."""
    if recorded is not None and identity(path) == recorded:
        return True, recorded
    before = _settled_identity(path, path.parent)
    if file_hash(path) != digest:
        return False, None
    return True, before if before is not None and identity(path) == before else None


def _record(folder: Path, meta: dict[str, Any], files: dict[str, list[int] | None]) -> None:
    """Rewrite the cache's meta.json with the identities of its files, where the folder can be written."""
    known = {name: found for name, found in files.items() if found is not None}
    if known != meta.get("files"):
        meta["files"] = known
        _replace_json(folder / "meta.json", meta)


def open_prepared(folder: Path, fingerprint: str, say_damage: bool = True) -> PreparedCorpus | None:
    """The cache in ``folder`` if it is complete, made from this very source and undamaged; None otherwise.

    Its vocabulary and ids must hash as they did when written; a file whose identity is the one recorded when it
    was last checked is not read (a copied or moved folder is read once). A damaged cache is said in one log line
    and prepared again.
    """
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != PREPARE_VERSION or meta.get("fingerprint") != fingerprint:
            return None
        suffix, n = meta["ids"], int(meta["chars"])
        np_dtype, torch_dtype = ID_FILES[suffix]
        ids_path = folder / f"ids.{suffix}"
        recorded = meta.get("files") or {}
        files: dict[str, list[int] | None] = {}
        for name, digest in (("vocab.json", meta["vocab_hash"]), (ids_path.name, meta["ids_hash"])):
            good = name != ids_path.name or ids_path.stat().st_size == n * np.dtype(np_dtype).itemsize
            if good:
                good, files[name] = _verify(folder / name, digest, recorded.get(name))
            if not good:
                if say_damage:
                    log.warning("the prepared corpus in %s is damaged (%s does not match its checksum): preparing "
                                "it again", folder, name)  # fmt: skip
                return None
        vocab = CharVocab(json.loads((folder / "vocab.json").read_bytes().decode("utf-8")))
        if len(vocab) != meta["vocab_size"] or n < 1:
            return None
    except (OSError, ValueError, KeyError, TypeError, VocabError):  # anything unreadable is simply not trusted
        return None
    _record(folder, meta, files)
    ids = torch.from_file(str(ids_path), shared=False, size=n, dtype=torch_dtype)
    return PreparedCorpus(folder, ids, vocab, meta)


@contextlib.contextmanager
def _locked(lock_path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` (held by one preparing process; released if it dies)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the folder rename alone keeps a reader from a partial cache
        yield
        return
    with open(lock_path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is preparing %s", what)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale(root: Path, group: str) -> None:
    """Under the group's lock, before building: temporaries of killed preparations, caches of older versions of
    the source and anything unusable, a file where a cache folder belongs too (runs that mapped an older cache keep
    reading it: its files stay open)."""
    ours = re.compile(rf"\.{re.escape(group)}-[A-Za-z0-9_]+\.tmp|{re.escape(group)}-[0-9a-f]{{12}}")
    for p in root.iterdir():
        if ours.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


class _Progress:
    """A rich progress bar over the file's bytes, once per pass (``done`` counts both: 0 .. 2 x size), shown only
    when preparing takes more than a second and the console is a terminal."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.start = total, what, time.monotonic()
        self.bar: Any = None
        self.task: Any = None

    def update(self, done: int) -> None:
        if self.bar is None:
            if time.monotonic() - self.start < 1.0:
                return
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            console = Console(stderr=True)
            if not console.is_terminal:
                self.start = float("inf")  # logs and pipes get the summary line only
                return
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TimeRemainingColumn(), console=console, transient=True)  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("", total=self.total // 2)
        second = done > self.total // 2
        self.bar.update(self.task, completed=done - second * (self.total // 2),
                        description=f"preparing {self.what}: {'ids' if second else 'vocabulary'}")  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _chars_seen(pieces: Iterator[tuple[str, int]], progress: Callable[[int], None]) -> tuple[np.ndarray, int]:
    """The code points that occur (sorted) and the number of chars."""
    seen = np.zeros(0x110000, dtype=bool)
    n = 0
    for piece, done in pieces:
        seen[_points(piece)] = True
        n += len(piece)
        progress(done)
    return np.flatnonzero(seen), n


def _build(
    path: Path, tmp: Path, where: str, errors: str, lowercase: bool, chunk_bytes: int,
    progress: Callable[[int], None], after_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Two passes over the text: the vocabulary (which chars occur), then the ids written in the smallest type."""
    size = path.stat().st_size

    def text(lower: bool, digest: Any = None) -> Iterator[tuple[str, int]]:
        return iter_text(path, where, errors, lower, chunk_bytes, digest)

    source_digest = new_digest()
    present, n = _chars_seen(text(False, source_digest), progress)
    if n == 0:
        raise CorpusError(f"{where} has no text after decoding; point data.path at a file with text in it")
    # Lowercasing is a char-by-char table (no lowered copy of each piece), unless a char lowercases to two chars
    # (e.g. 'İ') or depends on its neighbours (final sigma): then the pieces are lowercased and looked at again.
    per_char = lowercase and 0x3A3 not in present and all(len(chr(c).lower()) == 1 for c in present)
    lower_pieces = lowercase and not per_char
    if lower_pieces:
        present, n = _chars_seen(text(True), lambda done: None)
    targets = np.array([ord(chr(c).lower()) for c in present]) if per_char else present
    final = np.unique(targets)
    vocab = CharVocab([chr(c) for c in final])
    suffix = _SUFFIX[vocab.id_dtype]
    np_dtype = ID_FILES[suffix][0]
    table = np.zeros(int(present[-1]) + 1, dtype=np_dtype)  # code point as read -> id
    table[present] = np.searchsorted(final, targets).astype(np_dtype)
    ascii_table = None
    if suffix == "u8":  # for bytes.translate: id of each ASCII byte (a piece holds only chars of the vocabulary)
        full = np.zeros(256, dtype=np.uint8)
        full[: min(128, len(table))] = table[:128]
        ascii_table = full.tobytes()
    written, ids_digest = 0, new_digest()
    with open(tmp / f"ids.{suffix}", "wb") as out:
        for i, (piece, done) in enumerate(text(lower_pieces)):
            if ascii_table is not None and piece.isascii():
                block = piece.encode("ascii").translate(ascii_table)  # one byte per char, in C
            else:
                cps = _points(piece)
                if cps.size and int(cps.max()) >= len(table):
                    raise _changed(where)
                block = table[cps].tobytes()
            out.write(block)
            ids_digest.update(block)
            written += len(piece)
            progress(size + done)
            if after_chunk is not None:
                after_chunk(i)
        out.flush()
        os.fsync(out.fileno())
    if written != n:
        raise _changed(where)
    return {"chars": n, "ids": suffix, "vocab": vocab.to_list(), "source_hash": source_digest.hexdigest(),
            "ids_hash": ids_digest.hexdigest()}  # fmt: skip


def _changed(where: str) -> CorpusError:
    return CorpusError(f"{where} changed while it was being prepared; run again once it is complete")


def _write_json(path: Path, value: Any) -> str:
    """Write ``value`` as JSON; returns the hash of the bytes written."""
    data = json.dumps(value, ensure_ascii=False).encode("utf-8")
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    digest = new_digest()
    digest.update(data)
    return str(digest.hexdigest())


def _fingerprint(group: str, key: str, content_hash: str) -> str:
    """What a cache is trusted for: the settings group, ``key`` (e.g. a play's content) and the hash of the file's
    content as it is now, so an edit that keeps the size and the modification time still prepares it again."""
    return _sha(f"{group}\0{key}\0{content_hash}")[:16]


def prepare(
    path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    where: str | None = None,
    key: str = "",
    lowercase: bool = True,
    errors: str = "strict",
    chunk_bytes: int = CHUNK_BYTES,
    after_chunk: Callable[[int], None] | None = None,
) -> PreparedCorpus:
    """The ids of the text file ``path`` (lowercased if asked), prepared once into ``data_dir/prepared/``.

    The cache is trusted only when it was made from this file's content as it is now (a hash of the file, and
    ``key``) with the same settings, and its files still hash as they did when written (a file found as it was
    when last hashed, see ``identity``, is not read again); otherwise it is built again in a temporary folder and
    renamed into place, under a lock so that processes preparing the same file at once build it once.
    ``after_chunk`` is a test hook.
    """
    path = Path(path)
    where = where or f"corpus file {path}"
    root, group = cache_names(path, data_dir, lowercase, errors)
    content_hash = _text_hash(path, _index(root, group))
    fingerprint = _fingerprint(group, key, content_hash)
    folder = root / f"{group}-{fingerprint[:12]}"
    found = open_prepared(folder, fingerprint)
    if found is not None:
        return found
    if root.exists() and not root.is_dir():
        raise CorpusError(f"{root} is not a folder (prepared corpora go there); remove it or set paths.data_dir "
                          "to another folder")  # fmt: skip
    try:
        meta = _prepare_locked(path, root, group, folder, fingerprint, content_hash, where, lowercase, errors,
                               chunk_bytes, after_chunk)  # fmt: skip
    except Exception as err:
        failed = write_failure(err)
        if failed is None:
            raise
        raise storage_error(failed, root, f"{where} was not prepared (nothing partial is kept)") from err
    if meta is not None:
        log.info("prepared %s once: %d chars, %d-char vocabulary, %.1f s; later runs map %s", where, meta["chars"],
                 meta["vocab_size"], meta["seconds"], folder)  # fmt: skip
    found = open_prepared(folder, fingerprint)
    if found is None:
        raise CorpusError(f"the prepared corpus in {folder} cannot be read back; delete it and run again")
    return found


def _prepare_locked(
    path: Path, root: Path, group: str, folder: Path, fingerprint: str, content_hash: str, where: str,
    lowercase: bool, errors: str, chunk_bytes: int, after_chunk: Callable[[int], None] | None,
) -> dict[str, Any] | None:  # fmt: skip
    """Build the cache into ``folder`` under the group's lock; its meta, or None if another process built it."""
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{group}.lock", where):
        if open_prepared(folder, fingerprint, say_damage=False) is not None:  # another process may have built it
            return None
        _remove_stale(root, group)
        started = time.monotonic()
        settled = _settled_identity(path, root)
        before = path.stat()
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{group}-", suffix=".tmp"))
        bar = _Progress(2 * before.st_size, path.name)
        try:
            built = _build(path, tmp, where, errors, lowercase, chunk_bytes, bar.update, after_chunk)
            after = path.stat()
            if built.pop("source_hash") != content_hash or (after.st_size, after.st_mtime_ns) != (
                before.st_size, before.st_mtime_ns
            ):  # the file changed while it was read  # fmt: skip
                raise _changed(where)
            vocab = built.pop("vocab")
            vocab_hash = _write_json(tmp / "vocab.json", vocab)
            meta = {"version": PREPARE_VERSION, "fingerprint": fingerprint, "source": str(path.resolve()),
                    "lowercase": bool(lowercase), "errors": errors, "vocab_size": len(vocab), **built,
                    "vocab_hash": vocab_hash, "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
            _write_json(tmp / "meta.json", meta)  # last: a folder without it is never trusted
            mode = file_mode()
            for p in tmp.iterdir():
                os.chmod(p, mode)
            os.chmod(tmp, mode | ((mode & 0o444) >> 2))  # a folder: x wherever r
            fsync_dir(tmp)
            os.rename(tmp, folder)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            bar.close()
        # what later runs compare instead of hashing: the files as they are now, after the rename
        _record(
            folder,
            meta,
            {name: _settled_identity(folder / name, folder) for name in ("vocab.json", f"ids.{meta['ids']}")},
        )
        if settled is not None and identity(path) == settled:
            _replace_json(_index(root, group), {"identity": settled, "hash": content_hash})
    return meta


def corpus_ids(
    source: str, play: str, path: str | None, sha256: str | None, data_dir: str | os.PathLike[str], errors: str,
    lowercase: bool, max_chars: int | None = None,
) -> tuple[torch.Tensor, CharVocab]:  # fmt: skip
    """The configured corpus (a play or a file, see ``corpus.corpus_file``) as memory-mapped ids, prepared once, and
    the vocabulary of the chars they hold; ``max_chars`` keeps the first that many."""
    file, where, key = corpus_file(source, play, path, sha256, data_dir)
    errors = errors if source == "file" else "strict"  # the package's plays are valid UTF-8
    corpus = prepare(file, data_dir, where=where, key=key, lowercase=lowercase, errors=errors)
    ids, vocab = corpus.ids, corpus.vocab
    if max_chars and max_chars < len(ids):
        ids, vocab = keep_present(ids[:max_chars], vocab)
    return ids, vocab


# -- ids in another vocabulary ----------------------------------------------------------------------------------

_REMAP_CHUNK = 1 << 22


def _remap(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` in chunks (a materialised copy in the table's dtype, never a full int64 one)."""
    out = torch.empty(len(ids), dtype=table.dtype)
    for i in range(0, len(ids), _REMAP_CHUNK):
        out[i : i + _REMAP_CHUNK] = table[ids[i : i + _REMAP_CHUNK].long()]
    return out


def keep_present(ids: torch.Tensor, vocab: CharVocab) -> tuple[torch.Tensor, CharVocab]:
    """The vocabulary of the chars ``ids`` hold (a slice of a corpus may lack some): ``ids`` unchanged (still
    mapped) when it holds them all, else re-numbered in the smaller vocabulary."""
    counts = torch.zeros(len(vocab), dtype=torch.long)
    for i in range(0, len(ids), _REMAP_CHUNK):
        counts += torch.bincount(ids[i : i + _REMAP_CHUNK].long(), minlength=len(vocab))
    kept = torch.nonzero(counts).flatten()
    if len(kept) == len(vocab):
        return ids, vocab
    smaller = CharVocab([vocab.chars[i] for i in kept.tolist()])
    table = torch.zeros(len(vocab), dtype=smaller.id_dtype)
    table[kept] = torch.arange(len(kept)).to(smaller.id_dtype)
    return _remap(ids, table), smaller


def check_covers(target: CharVocab, chars: list[str], what: str = "data.vocab") -> None:
    """Every char of the text (``chars``) must be in ``target``; else an error naming ``what``, the setting
    that fixed the vocabulary."""
    missing = [c for c in chars if c not in target.index]
    if missing:
        raise VocabError(
            f"the corpus has {len(missing)} character(s) {what} lacks: {char_list(missing)}; add them to {what}, "
            "or train on a text without them"
        )


def encode_as(
    ids: torch.Tensor, vocab: CharVocab, target: CharVocab, unknown: str = "error"
) -> tuple[torch.Tensor, int]:
    """``ids`` (over ``vocab``, every char present) as ids of ``target``, the model's vocabulary: chars it lacks are
    an error naming them, as ``CharVocab.encode`` says it, or dropped with ``unknown='skip'``. Returns the ids (``ids``
    itself where the numbering agrees) and how many were dropped."""
    missing = [c for c in vocab.chars if c not in target.index]
    if missing and unknown != "skip":
        raise unknown_chars(missing)
    if not missing:
        return recode(ids, vocab, target), 0
    table = torch.tensor([target.index.get(c, -1) for c in vocab.chars], dtype=torch.long)
    parts, dropped = [], 0
    for i in range(0, len(ids), _REMAP_CHUNK):
        mapped = table[ids[i : i + _REMAP_CHUNK].long()]
        keep = mapped >= 0
        dropped += int((~keep).sum())
        parts.append(mapped[keep].to(target.id_dtype))
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=target.id_dtype)), dropped


def recode(ids: torch.Tensor, vocab: CharVocab, target: CharVocab) -> torch.Tensor:
    """``ids`` (over ``vocab``, every char present) as ids of ``target``; unchanged when the numbering agrees."""
    check_covers(target, vocab.chars)
    numbers = [target.index[c] for c in vocab.chars]
    if numbers == list(range(len(vocab))) and ids.dtype == target.id_dtype:
        return ids
    return _remap(ids, torch.tensor(numbers, dtype=torch.long).to(target.id_dtype))
