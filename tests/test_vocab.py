import pytest
import torch

from charlstm.core.errors import VocabError
from charlstm.core.vocab import CharVocab


def test_from_text_is_sorted_distinct_chars():
    v = CharVocab.from_text("banana\n")
    assert v.chars == ["\n", "a", "b", "n"]
    assert len(v) == 4


def test_encode_decode_round_trip():
    text = "the thane of cawdor\n"
    v = CharVocab.from_text(text)
    ids = v.encode(text)
    assert ids.dtype == torch.long
    assert ids.tolist() == [v.chars.index(c) for c in text]
    assert v.decode(ids) == text
    assert v.decode(ids.tolist()) == text


def test_list_round_trip_keeps_ids():
    v = CharVocab.from_text("Fair is foul, and foul is fair: ÿ 漢字")
    w = CharVocab.from_list(v.to_list())
    assert w == v
    assert all(isinstance(c, str) for c in v.to_list())
    assert w.encode("fair 漢").tolist() == v.encode("fair 漢").tolist()


def test_unknown_chars_error_lists_them_and_skip_drops_them():
    v = CharVocab.from_text("abc")
    with pytest.raises(VocabError, match=r"2 character\(s\).*'x', 'z'.*unknown=skip"):
        v.encode("azbx")
    assert v.decode(v.encode("azbx", unknown="skip")) == "ab"


def test_large_vocabulary_uses_wide_ids():
    text = "".join(chr(0x4E00 + i) for i in range(600))
    v = CharVocab.from_text(text)
    assert len(v) == 600 and v.id_dtype == torch.int16
    ids = v.encode(text, dtype=v.id_dtype)
    assert ids.max().item() == 599 and v.decode(ids) == text
    assert CharVocab.from_text("abc").id_dtype == torch.uint8
    assert CharVocab([chr(0x4E00 + i) for i in range(40_000)]).id_dtype == torch.int32


def test_bad_vocab_lists_are_refused():
    with pytest.raises(VocabError):
        CharVocab([])
    with pytest.raises(VocabError):
        CharVocab(["a", "a"])
    with pytest.raises(VocabError):
        CharVocab(["ab"])
