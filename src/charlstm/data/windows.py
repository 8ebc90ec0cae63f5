"""Windows and streams over one 1-D id tensor, and the shuffle of windows: torch only (eval.py scores texts with
them without importing Lightning). A batch is one gather from the ids, never a copy of the corpus as N x seq_len
samples."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from charlstm.core.errors import CorpusError

TARGETS = ("last", "all")  # data.targets
LAYOUTS = ("windows", "streams")  # data.layout: WindowDataset or StreamDataset

Batch = tuple[torch.Tensor, torch.Tensor]


def as_batch(batch: Batch) -> Batch:
    """collate_fn for datasets that build whole batches in ``__getitems__`` (module level so workers can pickle it)."""
    return batch


class WindowDataset(Dataset):
    """Windows of ``seq_len`` ids starting every ``stride`` chars over one 1-D tensor, gathered per batch.

    Target ``last``: the char right after the window (shape ``()``); ``all``: the window shifted by one (``(T,)``).
    Memory is the id tensor itself: a batch is one gather of B x T indices.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, stride: int = 1, targets: str = "last") -> None:
        self.ids, self.seq_len, self.stride, self.targets = ids, seq_len, stride, targets
        self._offsets = torch.arange(seq_len + 1)  # a window and its next char

    def __len__(self) -> int:
        return max(0, (len(self.ids) - self.seq_len - 1) // self.stride + 1)

    def __getitems__(self, indices: list[int]) -> Batch:
        starts = torch.as_tensor(indices, dtype=torch.long) * self.stride
        if self.targets == "last":
            x = self.ids[starts[:, None] + self._offsets[:-1]]
            y = self.ids[starts + self.seq_len]
        else:
            both = self.ids[starts[:, None] + self._offsets]
            x, y = both[:, :-1], both[:, 1:]
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
        self.start = 0  # the batch the next pass starts at (a resumed epoch; the pass after it starts at 0)

    def __len__(self) -> int:
        return math.ceil(self.length / self.seq_len)

    def __iter__(self):
        first, self.start = self.start, 0
        for i in range(first * self.seq_len, self.length, self.seq_len):
            yield self.inputs[:, i : i + self.seq_len].long(), self.targets[:, i : i + self.seq_len].long()


class ShuffledWindows(Sampler[int]):
    """Shuffled window indices: every window once per epoch, without a Python list of every index; under DDP each
    rank reads its own share of one shuffle.

    Up to ``exact_limit`` windows the order is one int64 ``torch.randperm``; beyond it a keyed pseudo-random
    permutation (``FeistelPermutation``) computed block by block in constant memory. Measured side by side
    (benchmarks/results/machinery.md): randperm takes 8 bytes a window, 125 MB at 16 M windows, 766 MB at 100 M,
    8 GB at 1 G and 32 GB for a 4 GB corpus at stride 1 (more than the 23 GB of the machine measured on); the
    Feistel order holds ~25 MB at any size; it is slower to compute (1.3 s against 0.7 s for 16 M, 21 s against 6 s
    for 100 M, one core), a cost lost in an epoch of 100 M windows, which trains for days. A random offset with a
    randperm over blocks would save the memory but keep a block's neighbouring windows (the same text shifted by one
    char) together in a batch.

    ``seed=None`` (one process): each epoch draws its seed from torch's RNG, the same order as
    ``RandomSampler`` (so a seeded run repeats, and a resumed one goes on with the restored RNG). With ``seed``
    (DDP: every rank must shuffle alike) epoch ``e`` uses ``seed + e``, as ``DistributedSampler`` does; Lightning
    calls ``set_epoch``. Rank ``r`` of ``world`` reads positions ``r, r + world, ...`` of the shuffle, the last
    round wrapping to the start so that every rank reads ``ceil(n / world)`` windows (ranks must take the same
    number of steps), as ``DistributedSampler`` pads.

    ``epoch_seed`` is the seed of the shuffle being read; ``resume(epoch_seed, start)`` makes the next pass that
    shuffle again from this rank's position ``start`` on (a run resumed inside an epoch).
    """

    BLOCK = 8192  # indices computed per tensor operation

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int | None = None,
                 exact_limit: int = 1 << 24) -> None:  # fmt: skip
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.n, self.rank, self.world, self.seed, self.exact_limit = n, rank, world, seed, exact_limit
        self.epoch = 0
        self.epoch_seed: int | None = None
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch_seed: int, start: int) -> None:
        """The next pass reads the shuffle of ``epoch_seed`` from position ``start``; the pass after it is new."""
        self._resume = (epoch_seed, start)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self):
        if self.n == 0:
            return
        if self._resume is not None:  # the rest of an interrupted epoch: its seed, no new draw
            (seed, first), self._resume = self._resume, None
        elif self.seed is not None:
            seed, first = self.seed + self.epoch, 0
        else:
            seed, first = int(torch.empty((), dtype=torch.int64).random_()), 0
        self.epoch_seed = seed
        if self.n <= self.exact_limit:
            permute = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).__getitem__
        else:
            permute = FeistelPermutation(self.n, seed)
        count = len(self)
        for start in range(first, count, self.BLOCK):
            positions = torch.arange(start, min(start + self.BLOCK, count)) * self.world + self.rank
            yield from permute(positions % self.n).tolist()


class ResumableLoader(DataLoader):
    """A training DataLoader that knows where it is in the epoch, so a run resumed inside an epoch reads just the
    rest of it, in the order the uninterrupted run read it.

    Lightning saves ``state_dict()`` (the batches of this pass handed out, and the shuffle's seed) in every
    checkpoint and, on a resume inside an epoch, gives it back to ``load_state_dict`` before the loader is iterated:
    the next pass then starts at that batch (``ShuffledWindows.resume``, ``StreamDataset.start``; another sampler,
    e.g. the sequential one Lightning puts in for ``overfit_batches``, by skipping batches). A pass draws its base
    seed from torch's random generator as it starts; a resumed pass gives the draw back, so dropout goes on with the
    draws of the run that never stopped (the checkpoint restored the generator as it was after the last step).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._read = 0  # batches of the current pass handed out
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        sampler = self.sampler if isinstance(self.sampler, ShuffledWindows) else None
        return {"batches": self._read, "epoch_seed": sampler and sampler.epoch_seed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def __iter__(self):
        resume, self._resume = self._resume, None
        done = int(resume["batches"]) if resume else 0
        if not done:
            self._read = 0
            return self._count(super().__iter__(), 0)
        skip = 0
        if isinstance(self.sampler, ShuffledWindows) and resume.get("epoch_seed") is not None:
            self.sampler.resume(int(resume["epoch_seed"]), done * self.batch_size)
        elif isinstance(self.dataset, StreamDataset):
            self.dataset.start = done
        else:
            skip = done
        rng = torch.get_rng_state()
        iterator = super().__iter__()
        torch.set_rng_state(rng)
        self._read = done
        return self._count(iterator, skip)

    def _count(self, iterator, skip: int):
        for i, batch in enumerate(iterator):
            if i < skip:
                continue
            self._read += 1
            yield batch


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
