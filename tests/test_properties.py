"""Property-based checks: the vocabulary round-trips any Unicode text, and every window, stream and split
reads exactly the ids it should, never past the end and never across the train/validation boundary."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from charlstm.core.errors import CorpusError
from charlstm.core.vocab import CharVocab
from charlstm.data.windows import StreamDataset, WindowDataset
from charlstm.training.datamodule import split_ids

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# every code point, lone surrogates included (a Python str may hold them, e.g. from surrogateescape)
any_char = st.characters(codec=None, exclude_categories=())
any_text = st.text(alphabet=any_char, min_size=1, max_size=200)


# -- vocabulary -----------------------------------------------------------------------------------------------


@FAST
@given(any_text)
def test_vocab_round_trips_any_text(text):
    vocab = CharVocab.from_text(text)
    assert vocab.chars == sorted(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and len(ids) == len(text)
    assert vocab.decode(ids) == text
    assert CharVocab.from_list(vocab.to_list()) == vocab


@FAST
@given(st.lists(any_char, min_size=1, max_size=600, unique=True), st.randoms(use_true_random=False))
def test_vocab_round_trips_in_its_compact_id_type(chars, rnd):
    text = "".join(rnd.choice(chars) for _ in range(3 * len(chars))) + "".join(chars)
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text, dtype=vocab.id_dtype)
    assert ids.dtype == (torch.uint8 if len(chars) <= 256 else torch.int16)
    assert int(ids.max()) == len(vocab) - 1 and int(ids.min()) == 0
    assert vocab.decode(ids.long()) == text


@FAST
@given(any_text, any_text)
def test_unknown_chars_are_dropped_with_skip_and_nothing_else(known, other):
    vocab = CharVocab.from_text(known)
    kept = "".join(c for c in other if c in vocab.index)
    assert vocab.decode(vocab.encode(other, unknown="skip")) == kept


# -- windows --------------------------------------------------------------------------------------------------

lengths = st.integers(0, 300)
seq_lens = st.integers(1, 40)
strides = st.integers(1, 9)


@FAST
@given(lengths, seq_lens, strides, st.sampled_from(["last", "all"]))
def test_every_window_reads_its_own_ids_and_stays_in_bounds(n, seq_len, stride, targets):
    ids = torch.arange(n)  # id == position, so a window shows where it reads
    ds = WindowDataset(ids, seq_len, stride, targets)
    starts = [s for s in range(0, n, stride) if s + seq_len < n]  # a window needs its next char as target
    assert len(ds) == len(starts)
    for i, s in enumerate(starts):
        x, y = ds[i]
        assert x.tolist() == list(range(s, s + seq_len))
        assert y.tolist() == (s + seq_len if targets == "last" else list(range(s + 1, s + seq_len + 1)))
    for bad in (len(ds), len(ds) + 1, -1):
        try:
            ds[bad]
        except IndexError:
            continue
        raise AssertionError(f"index {bad} of {len(ds)} did not raise IndexError")


@FAST
@given(st.integers(2, 300), seq_lens, strides, st.data())
def test_a_batch_equals_its_windows_one_by_one(n, seq_len, stride, data):
    ds = WindowDataset(torch.arange(n), seq_len, stride, "all")
    assume(len(ds) > 0)
    idx = data.draw(st.lists(st.integers(0, len(ds) - 1), min_size=1, max_size=16))
    x, y = ds.__getitems__(idx)
    assert torch.equal(x, torch.stack([ds[i][0] for i in idx]))
    assert torch.equal(y, torch.stack([ds[i][1] for i in idx]))


@FAST
@given(st.integers(2, 400), st.floats(0.01, 0.99), seq_lens)
def test_split_is_contiguous_and_no_window_crosses_it(n, fraction, seq_len):
    ids = torch.arange(n)
    try:
        train, val = split_ids(ids, fraction, seq_len)
    except CorpusError as err:  # too short: refused in one line
        assert "too short" in str(err)
        return
    assert torch.equal(torch.cat([train, val]), ids)
    assert len(train) >= seq_len + 1 and len(val) >= seq_len + 1
    ds = WindowDataset(train, seq_len, 1, "last")
    x, y = ds.__getitems__(list(range(len(ds))))
    assert int(x.max()) < len(train) and int(y.max()) < len(train)  # training never reads validation text


# -- streams --------------------------------------------------------------------------------------------------


@FAST
@given(st.integers(2, 400), st.integers(1, 8), seq_lens, st.integers(1, 3))
def test_streams_cover_each_rank_share_once_in_order(n, batch_size, seq_len, world):
    ids = torch.arange(n)
    share = n // world
    assume((share - 1) // batch_size >= 1)
    seen = []
    for rank in range(world):
        ds = StreamDataset(ids, batch_size, seq_len, rank, world)
        batches = list(ds)
        assert len(batches) == len(ds)
        x = torch.cat([b[0] for b in batches], dim=1)
        y = torch.cat([b[1] for b in batches], dim=1)
        length = (share - 1) // batch_size
        base = rank * share
        for b in range(batch_size):  # row b reads its stretch of this rank's share, left to right
            assert x[b].tolist() == list(range(base + b * length, base + (b + 1) * length))
        assert torch.equal(y, x + 1)  # every target is the next char
        assert all(bx.shape[1] <= seq_len for bx, _ in batches)
        seen.extend(x.flatten().tolist())
    assert len(seen) == len(set(seen))  # no char read twice, across ranks too
