"""CharDataModule: one 1-D id tensor over the corpus, read as windows or as parallel streams, never copied
into N x seq_len samples; inputs are encoded (normalized / onehot / embedding ids) after the batch is moved."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from charlstm.corpus import play_names, play_text
from charlstm.errors import ConfigError, CorpusError
from charlstm.net import ENCODINGS, encode_inputs
from charlstm.prepared import MappedPages, check_covers, corpus_ids, recode
from charlstm.vocab import CharVocab

LAYOUTS = ("windows", "streams")
TARGETS = ("last", "all")

Batch = tuple[torch.Tensor, torch.Tensor]


def _as_batch(batch: Batch) -> Batch:
    """collate_fn for datasets that build whole batches in ``__getitems__`` (module level so workers can pickle it)."""
    return batch


class WindowDataset(Dataset):
    """Windows of ``seq_len`` ids starting every ``stride`` chars over one 1-D tensor, gathered per batch.

    Target ``last``: the char right after the window (shape ``()``); ``all``: the window shifted by one (``(T,)``).
    Memory is the id tensor itself: a batch is one gather of B x T indices.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, stride: int = 1, targets: str = "last") -> None:
        if targets not in TARGETS:
            raise ConfigError(f"data.targets={targets!r} is not allowed; use 'last' or 'all'")
        self.ids, self.seq_len, self.stride, self.targets = ids, seq_len, stride, targets
        self._offsets = torch.arange(seq_len + 1)  # a window and its next char
        self._pages = MappedPages(ids, every=64)  # a mapped corpus: unmap what every 64 windows read

    def __len__(self) -> int:
        return max(0, (len(self.ids) - self.seq_len - 1) // self.stride + 1)

    def __getitems__(self, indices: list[int]) -> Batch:
        every = self._pages.every
        if len(indices) > every:  # a big batch (validation's): gathered in parts, unmapping as it goes
            parts = [self.__getitems__(indices[i : i + every]) for i in range(0, len(indices), every)]
            return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
        starts = torch.as_tensor(indices, dtype=torch.long) * self.stride
        if self.targets == "last":
            x = self.ids[starts[:, None] + self._offsets[:-1]]
            y = self.ids[starts + self.seq_len]
        else:
            both = self.ids[starts[:, None] + self._offsets]
            x, y = both[:, :-1], both[:, 1:]
        self._pages.read(len(indices))
        return x.long(), y.long()

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(index)
        x, y = self.__getitems__([index])
        return x[0], y[0]


class StreamDataset(IterableDataset):
    """The text as ``batch_size`` parallel contiguous streams, read in consecutive ``seq_len`` chunks.

    Stream b holds chars ``[b*L, (b+1)*L)`` of this rank's share of the text; batch i is columns
    ``[i*T, (i+1)*T)`` of every stream, so row b of batch i+1 continues row b of batch i (the model carries
    its hidden state across them). Under DDP each rank takes its own contiguous share of equal length.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        share = len(ids) // world_size
        part = ids[rank * share : (rank + 1) * share]
        length = (len(part) - 1) // batch_size
        if length < 1:
            raise CorpusError(
                f"the training text ({len(ids)} chars) is too short for {batch_size} streams on {world_size} "
                "process(es); use a longer text or a smaller data.batch_size"
            )
        self.seq_len, self.length = seq_len, length
        self.inputs = part[: batch_size * length].view(batch_size, length)
        self.targets = part[1 : batch_size * length + 1].view(batch_size, length)
        self._pages = MappedPages(ids, every=256)  # a mapped corpus: unmap what every 256 batches read

    def __len__(self) -> int:
        return math.ceil(self.length / self.seq_len)

    def __iter__(self):
        for i in range(0, self.length, self.seq_len):
            batch = self.inputs[:, i : i + self.seq_len].long(), self.targets[:, i : i + self.seq_len].long()
            self._pages.read()
            yield batch


class ShuffledWindows(Sampler[int]):
    """Shuffled window indices: every window once per epoch, without a Python list of every index; under DDP each
    rank reads its own share of one shuffle.

    Up to ``exact_limit`` windows the order is one int64 randperm; beyond it (a big corpus: 400 M windows would be a
    3.2 GB permutation) a keyed pseudo-random permutation computed block by block in constant memory.

    ``seed=None`` (one process): each epoch draws its seed from torch's RNG, the same order as
    ``RandomSampler`` (so a seeded run repeats, and a resumed one goes on with the restored RNG). With ``seed``
    (DDP: every rank must shuffle alike) epoch ``e`` uses ``seed + e``, as ``DistributedSampler`` does; Lightning
    calls ``set_epoch``. Rank ``r`` of ``world`` reads positions ``r, r + world, ...`` of the shuffle, the last
    round wrapping to the start so that every rank reads ``ceil(n / world)`` windows (ranks must take the same
    number of steps), as ``DistributedSampler`` pads.
    """

    BLOCK = 8192  # indices computed per tensor operation

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int | None = None,
                 exact_limit: int = 1 << 24) -> None:  # fmt: skip
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.n, self.rank, self.world, self.seed, self.exact_limit = n, rank, world, seed, exact_limit
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self):
        if self.n == 0:
            return
        seed = self.seed + self.epoch if self.seed is not None else int(torch.empty((), dtype=torch.int64).random_())
        if self.n <= self.exact_limit:
            permute = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).__getitem__
        else:
            permute = FeistelPermutation(self.n, seed)
        count = len(self)
        for start in range(0, count, self.BLOCK):
            positions = torch.arange(start, min(start + self.BLOCK, count)) * self.world + self.rank
            yield from permute(positions % self.n).tolist()


_MIX1, _MIX2 = 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)  # splitmix64's, as signed int64
_LOW = {k: (1 << k) - 1 for k in (33, 34, 37)}


class FeistelPermutation:
    """A keyed bijection of ``range(n)`` in O(1) memory: a 4-round Feistel network on the smallest even number of
    bits covering ``n``, cycle-walking back into range (at most 4x the domain, so few extra rounds on average)."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.half = max(1, (max(1, (n - 1).bit_length()) + 1) // 2)
        self.mask = (1 << self.half) - 1
        gen = torch.Generator().manual_seed(seed)
        self.keys = torch.randint(1, 1 << 62, (self.ROUNDS,), generator=gen).tolist()

    def _round(self, x: torch.Tensor, key: int) -> torch.Tensor:
        """splitmix64 of ``x + key`` (int64 products wrap; shifts masked to act unsigned), cut to the half's bits."""
        z = x + key
        z = (z ^ ((z >> 30) & _LOW[34])) * _MIX1
        z = (z ^ ((z >> 27) & _LOW[37])) * _MIX2
        return (z ^ ((z >> 31) & _LOW[33])) & self.mask

    def _once(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self.half) | right

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        y = self._once(index.long())
        out_of_range = y >= self.n
        while out_of_range.any():
            y[out_of_range] = self._once(y[out_of_range])
            out_of_range = y >= self.n
        return y


def split_ids(ids: torch.Tensor, val_fraction: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous split: training text first, validation text last; each must hold one window plus a target."""
    n_val = round(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    if len(train) < seq_len + 1 or len(val) < seq_len + 1:
        raise CorpusError(
            f"the corpus has {len(ids)} chars, too short for a training and a validation window of "
            f"data.seq_len+1={seq_len + 1} chars each with data.val_fraction={val_fraction} "
            f"(train {len(train)}, validation {len(val)}); use a longer text or a smaller data.seq_len"
        )
    return train, val


def extra_play_names(extra_plays: str | list[str] | None, source: str, play: str) -> list[str]:
    """The plays added as extra training text: none for ``null``/``none``; ``auto``: every other play when the
    corpus is a play from the package, none for a file; ``all``: every other play; or the named plays (a list,
    one name, or names joined by commas). The main corpus's own plays are never added again, so its validation
    tail cannot reach the training text (``play: all`` leaves nothing extra)."""
    if extra_plays is None or extra_plays is False:
        return []
    if isinstance(extra_plays, str):
        value = extra_plays.strip()
        if value.lower() in ("", "none", "null"):
            return []
        if value == "auto":
            if source != "play":
                return []
            value = "all"
        requested = [n.strip() for n in value.split(",") if n.strip()]
    elif isinstance(extra_plays, list | tuple):
        requested = []
        for name in extra_plays:
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(
                    f"data.extra_plays lists {name!r}, which is not a play name; use auto, all, none, "
                    "a play name or a list of them, e.g. data.extra_plays=[hamlet,othello]"
                )
            requested.append(name.strip())
    else:
        raise ConfigError(
            f"data.extra_plays={extra_plays!r} is not allowed; use auto, all, none, a play name or a list of them"
        )
    known = play_names()
    if "all" in requested:
        names = known
    else:
        unknown = [n for n in requested if n not in known]
        if unknown:
            raise ConfigError(
                f"data.extra_plays names no play called {unknown[0]!r}; use auto, all, none or play names from: "
                f"{', '.join(known)}"
            )
        names = list(dict.fromkeys(requested))
    main = set(known) if source == "play" and play == "all" else {play} if source == "play" else set()
    return [n for n in names if n not in main]


def fixed_vocab(chars: list[str] | None) -> CharVocab | None:
    """The vocabulary ``data.vocab`` fixes (fine-tuning), each element checked and named when wrong."""
    if chars is None:
        return None
    if isinstance(chars, str):
        raise ConfigError(
            f"data.vocab={chars!r} is a string; give a list of single characters, e.g. data.vocab=[a,b,c]"
        )
    out: list[str] = []
    for c in chars:
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 9:
            c = str(c)  # Hydra reads [a,b,1] as a list holding the int 1
        if not isinstance(c, str) or len(c) != 1:
            raise ConfigError(
                f"data.vocab element {c!r} is not a single character; data.vocab must be a list of single "
                "characters, e.g. data.vocab=[a,b,c]"
            )
        if c in out:
            raise ConfigError(f"data.vocab lists {c!r} twice; list each character once")
        out.append(c)
    if not out:
        raise ConfigError("data.vocab is an empty list; list the characters, or set data.vocab=null")
    return CharVocab(out)


def split_test(train: torch.Tensor, total: int, test_fraction: float, seq_len: int) -> tuple[torch.Tensor, ...]:
    """The held-out test text: the last ``test_fraction`` of the whole corpus before its validation tail, so the
    validation text stays what it is without a test split; returns (training text, test text)."""
    n_test = round(total * test_fraction)
    rest, test = train[: len(train) - n_test], train[len(train) - n_test :]
    if len(test) < seq_len + 1 or len(rest) < seq_len + 1:
        raise CorpusError(
            f"the corpus has {total} chars, too short for a test window of data.seq_len+1={seq_len + 1} chars with "
            f"data.test_fraction={test_fraction} (train {len(rest)}, test {len(test)}); use a longer text or a "
            "larger data.test_fraction"
        )
    return rest, test


class CharDataModule(pl.LightningDataModule):
    """Reads the corpus, builds the vocabulary and serves training and validation batches."""

    def __init__(
        self,
        source: str = "play",
        play: str = "macbeth",
        path: str | None = None,
        sha256: str | None = None,
        data_dir: str = "data",
        errors: str = "strict",
        lowercase: bool = True,
        max_chars: int | None = None,
        seq_len: int = 50,
        stride: int = 1,
        layout: str = "windows",
        targets: str = "last",
        encoding: str = "normalized",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        val_max_windows: int | None = None,
        val_context: int | None = None,
        batch_size: int = 30,
        val_batch_size: int = 1024,
        num_workers: int = 0,
        vocab: list[str] | None = None,
        extra_plays: str | list[str] | None = None,
        main_repeat: int = 1,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ConfigError(f"data.layout={layout!r} is not allowed; use 'windows' or 'streams'")
        if encoding not in ENCODINGS:
            raise ConfigError(f"data.encoding={encoding!r} is not allowed; use one of {', '.join(ENCODINGS)}")
        self.corpus_args = dict(source=source, play=play, path=path, sha256=sha256,
                                data_dir=data_dir, errors=errors)  # fmt: skip
        self.lowercase, self.max_chars = lowercase, max_chars
        self.seq_len, self.stride, self.layout, self.targets = seq_len, stride, layout, targets
        self.encoding, self.val_fraction, self.val_max_windows = encoding, val_fraction, val_max_windows
        self.test_fraction = test_fraction
        self.val_context = val_context or seq_len
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self._fixed_vocab = vocab
        self.extra_plays, self.main_repeat = extra_plays, main_repeat
        self.vocab: CharVocab | None = None
        self.train_ids: torch.Tensor | None = None
        self.val_ids: torch.Tensor | None = None
        self.test_ids: torch.Tensor | None = None  # only with data.test_fraction > 0

    def load(self) -> CharVocab:
        """Map the prepared corpus, fix the vocabulary and cut the id tensors (training, validation, test when
        asked); returns the vocabulary."""
        if self.vocab is not None:
            return self.vocab
        # ids memory-mapped from data_dir/prepared/ (the text is read and encoded once, on the first run)
        ids, vocab = corpus_ids(**self.corpus_args, lowercase=self.lowercase, max_chars=self.max_chars)
        if len(ids) == 0:
            raise CorpusError("the corpus is empty; choose a text with characters in it")
        extra = self._extra_text()
        extra_chars = CharVocab.from_text(extra).chars if extra else []
        target = fixed_vocab(self._fixed_vocab)
        if target is None:
            target = CharVocab(sorted(set(vocab.chars) | set(extra_chars))) if extra else vocab
        ids = recode(ids, vocab, target)  # a copy only where the numbering differs (a fixed or a wider vocabulary)
        context = max(self.seq_len, self.val_context)
        train, self.val_ids = split_ids(ids, self.val_fraction, context)
        if self.test_fraction:
            train, self.test_ids = split_test(train, len(ids), self.test_fraction, context)
        if extra:
            # More training text only: the validation split stays the main corpus's own tail. The main
            # training text comes last, `main_repeat` times, so some streams read in-domain text every step.
            # (A play corpus is small: the joined copy costs little; a user's big file is only copied so when
            # data.extra_plays asks for plays on top of it.)
            check_covers(target, extra_chars)
            train = torch.cat([target.encode(extra, dtype=target.id_dtype), *[train] * self.main_repeat])
        self.train_ids = train
        self.vocab = target
        return target

    def _extra_text(self) -> str:
        """The plays ``extra_plays`` adds as training text, joined ('' for none)."""
        names = extra_play_names(self.extra_plays, self.corpus_args["source"], self.corpus_args["play"])
        extra = "\n\n".join(play_text(n, self.corpus_args["data_dir"]) for n in names)
        return extra.lower() if self.lowercase else extra

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataset(self) -> Dataset:
        self.load()
        if self.layout == "streams":
            rank, world = self._rank()
            return StreamDataset(self.train_ids, self.batch_size, self.seq_len, rank, world)
        return WindowDataset(self.train_ids, self.seq_len, self.stride, self.targets)

    def val_dataset(self) -> WindowDataset:
        """Every validation char predicted from the ``val_context`` chars before it (or an even subsample).

        The context defaults to ``seq_len``; recipes set it to 50 (the tutorial's window) so that their
        val/bpc compare like for like whatever they train on.
        """
        self.load()
        n = len(self.val_ids) - self.val_context
        stride = 1 if not self.val_max_windows else max(1, math.ceil(n / self.val_max_windows))
        return WindowDataset(self.val_ids, self.val_context, stride, "last")

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        if isinstance(ds, StreamDataset):
            # Order is the point of streams: one process, batches already formed.
            return DataLoader(ds, batch_size=None, num_workers=0)
        rank, world = self._rank()
        seed = None
        if world > 1:  # one shuffle for all ranks: rank 0's seed (an unseeded run's ranks draw different ones)
            seed = self.trainer.strategy.broadcast(int(torch.randint(1 << 62, ()).item()), src=0)
        sampler = ShuffledWindows(len(ds), rank, world, seed)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=_as_batch)  # fmt: skip

    def test_dataset(self) -> WindowDataset:
        """Every test char predicted from the ``val_context`` chars before it (no subsample: scored once)."""
        self.load()
        if self.test_ids is None:
            raise ConfigError("there is no test text: set data.test_fraction (e.g. 0.1) to hold one out")
        return WindowDataset(self.test_ids, self.val_context, 1, "last")

    def test_dataloader(self) -> DataLoader:
        return self._scoring_loader(self.test_dataset())

    def val_dataloader(self) -> DataLoader:
        return self._scoring_loader(self.val_dataset())

    def _scoring_loader(self, ds: WindowDataset) -> DataLoader:
        """In order; under DDP each rank scores its own share, every window once (a DistributedSampler would repeat
        a few to even the shares out, and they would count twice in the loss the ranks sum)."""
        rank, world = self._rank()
        sampler = None
        if 1 < world <= len(ds):
            sampler = UnrepeatedDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False, sampler=sampler, collate_fn=_as_batch)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        x, y = batch
        return encode_inputs(x, self.encoding, len(self.vocab)), y
