"""CharVocab: the sorted set of characters of a text, and the id <-> char mapping that travels in checkpoints."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from charlstm.core.errors import VocabError


def codepoints(text: str) -> np.ndarray:
    """The text's code points as a uint32 array, without a Python object per character."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


_CHUNK = 1 << 22


class CharVocab:
    """Sorted distinct characters; id i is ``chars[i]``."""

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars:
            raise VocabError("the vocabulary is empty: the text has no characters")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise VocabError("a vocabulary must be a list of single characters")
        if len(set(chars)) != len(chars):
            raise VocabError("the vocabulary lists a character twice")
        self.chars: list[str] = chars
        self.index: dict[str, int] = {c: i for i, c in enumerate(chars)}
        self._table: np.ndarray | None = None

    @property
    def id_dtype(self) -> torch.dtype:
        """The smallest dtype that holds every id: corpora are stored in it, batches are cast to int64."""
        if len(self.chars) <= 256:
            return torch.uint8
        return torch.int16 if len(self.chars) <= 1 << 15 else torch.int32

    def _lookup(self, max_codepoint: int) -> np.ndarray:
        """A table from code point to id (-1 where absent) covering ``max_codepoint``."""
        if self._table is None or len(self._table) <= max_codepoint:
            cps = np.array([ord(c) for c in self.chars], dtype=np.int64)
            table = np.full(max(int(cps.max()), max_codepoint) + 1, -1, dtype=np.int32)
            table[cps] = np.arange(len(cps), dtype=np.int32)
            self._table = table
        return self._table

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        present: set[int] = set()
        for i in range(0, len(text), _CHUNK):
            present.update(np.unique(codepoints(text[i : i + _CHUNK])).tolist())
        return cls([chr(c) for c in sorted(present)])

    @classmethod
    def from_list(cls, chars: Iterable[str]) -> CharVocab:
        return cls(list(chars))

    def to_list(self) -> list[str]:
        return list(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(tuple(self.chars))

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} chars)"

    def encode(self, text: str, unknown: str = "error", dtype: torch.dtype = torch.long) -> torch.Tensor:
        """Ids of ``text`` as a 1-D tensor; ``unknown='skip'`` drops characters the vocabulary lacks.

        Works in chunks through a code-point lookup table, so a 100 MB corpus needs no Python object per char.
        """
        missing = set()
        parts = []
        for i in range(0, len(text), _CHUNK):
            cps = codepoints(text[i : i + _CHUNK])
            table = self._lookup(int(cps.max()) if cps.size else 0)
            ids = table[cps]
            bad = ids < 0
            if bad.any():
                missing.update(chr(c) for c in np.unique(cps[bad]))
                ids = ids[~bad]
            parts.append(torch.from_numpy(ids).to(dtype))
        if missing and unknown != "skip":
            raise unknown_chars(missing)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)


def char_list(chars: Sequence[str], limit: int = 20) -> str:
    """``'a', 'b' and 3 more``: up to ``limit`` chars, quoted, for an error line."""
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return ", ".join(repr(c) for c in chars[:limit]) + more


def unknown_chars(missing: Iterable[str], what: str = "text") -> VocabError:
    """The error for a text (or ``what``) holding chars the model's vocabulary lacks."""
    chars = sorted(set(missing))
    return VocabError(
        f"{what} has {len(chars)} character(s) the model's vocabulary lacks: {char_list(chars)}; "
        "remove them or pass unknown=skip to drop them"
    )
