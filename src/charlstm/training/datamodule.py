"""CharDataModule: one 1-D id tensor over the corpus (prepared once, memory-mapped), split, read as windows or as
parallel streams (charlstm.data.windows); inputs are encoded (normalized / onehot / embedding ids) after the batch is
moved."""

from __future__ import annotations

import math
import re

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from charlstm.core.errors import ConfigError, CorpusError
from charlstm.core.net import encode_inputs
from charlstm.core.vocab import CharVocab
from charlstm.data.corpus import play_names, play_text
from charlstm.data.prepared import check_covers, corpus_ids, recode
from charlstm.data.windows import Batch, ResumableLoader, ShuffledWindows, StreamDataset, WindowDataset, as_batch


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


# a character as the command line can give it: \n, \t, \r, \\, \0, \xhh, \uhhhh or \Uhhhhhhhh (as in Python)
_ESCAPE = re.compile(r"\\(?:[ntr0\\'\"]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


def unescape_char(text: str) -> str:
    """The character an escape such as ``\\n`` names; any other text unchanged."""
    return text.encode("ascii").decode("unicode_escape") if _ESCAPE.fullmatch(text) else text


def fixed_vocab(chars: list[str] | None) -> CharVocab | None:
    """The vocabulary ``data.vocab`` fixes (fine-tuning), each element checked and named when wrong. An element may
    be an escape (``\\n`` for a newline, ``\\t``, ``\\u00e9`` ...): a shell cannot pass a newline in an argument."""
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
        if isinstance(c, str):
            c = unescape_char(c)
        if not isinstance(c, str) or len(c) != 1:
            raise ConfigError(
                f"data.vocab element {c!r} is not a single character; data.vocab must be a list of single "
                "characters, e.g. data.vocab=[a,b,c] (escapes name one: \\n, \\t, \\\\, \\u00e9)"
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


def trainer_of(module: pl.LightningModule) -> pl.Trainer | None:
    """The trainer the module is attached to, or None (a module built or loaded on its own): Lightning's public
    ``module.trainer`` raises RuntimeError when there is none."""
    try:
        return module.trainer
    except RuntimeError:
        return None


STREAMS_KEY = "charlstm_stream_state"  # where a checkpoint keeps the streams' carried hidden state, every rank's


def stream_states(module: pl.LightningModule, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The carried (h, c) of every rank, stacked rank by rank (under DDP a collective call: every rank saves)."""
    h, c = state
    trainer = trainer_of(module)
    if trainer is not None and trainer.world_size > 1:
        return module.all_gather(h).cpu(), module.all_gather(c).cpu()
    return h[None].cpu(), c[None].cpu()


def own_stream_state(module: pl.LightningModule, saved: tuple[torch.Tensor, ...] | None) -> tuple | None:
    """This rank's carried (h, c) from a checkpoint's :func:`stream_states`; None (zeros) when the checkpoint
    has none or was written by another number of processes (each rank's streams were other text)."""
    trainer = trainer_of(module)
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if saved is None or len(saved[0]) != world:
        return None
    return saved[0][rank], saved[1][rank]


def fix_resume_point(checkpoint: dict) -> None:
    """Where a run resumes from this checkpoint: inside an epoch that was cut short, and at the start of the next
    epoch after an epoch's last batch.

    Lightning counts an epoch that ``trainer.max_steps``, ``max_time`` or a stop cut short as done (its end hooks
    ran), so a resume would start the next epoch and never train the rest of this one: the checkpoint records it
    as started, not finished, which is how Lightning saves inside an epoch, and the resume reads the epoch's
    remaining batches (the loader's position travels in the checkpoint too). After an epoch's last batch (a stop
    there, or ``limit_train_batches``) the loader's state is that of a new pass, with no carried streams state.
    Lightning's loop progress layout is not a public API; tests/test_midepoch_resume.py fails if it changes.
    """
    try:
        fit = checkpoint["loops"]["fit_loop"]
        epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
        loaders = fit["state_dict"].get("combined_loader", [])
        if batches["is_last_batch"]:  # every batch of the epoch read: the next pass is the next epoch's, whole
            for state in loaders:
                state.update(batches=0, epoch_seed=None)
            checkpoint.pop(STREAMS_KEY, None)  # and its streams start from zeros (Lightning may skip the epoch's
            return  # start hooks when it resumes there)
        if batches["current"]["ready"] == 0:
            return  # the next epoch has not read a batch yet
        if epochs["current"]["processed"] != epochs["current"]["started"]:
            return  # saved inside the epoch: already a resume inside it
        for counts in (epochs["current"], epochs["total"]):
            counts["processed"] = counts["completed"] = counts["started"] - 1
    except KeyError:
        return
    checkpoint["epoch"] = epochs["current"]["completed"]


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
        self.shuffle_seed: int | None = None  # the windows' shuffle seed under DDP, drawn once per run

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

    def train_dataloader(self) -> ResumableLoader:
        """Resumable: a run resumed inside an epoch reads the rest of it, as an uninterrupted run would."""
        ds = self.train_dataset()
        if isinstance(ds, StreamDataset):
            # Order is the point of streams: one process, batches already formed.
            loader = ResumableLoader(ds, batch_size=None, num_workers=0)
        else:
            rank, world = self._rank()
            if world > 1 and self.shuffle_seed is None:
                # one shuffle for all ranks: rank 0's seed (an unseeded run's ranks draw different ones); a resumed
                # run has it from its checkpoint, so it shuffles the next epochs as it would have
                self.shuffle_seed = self.trainer.strategy.broadcast(int(torch.randint(1 << 62, ()).item()), src=0)
            sampler = ShuffledWindows(len(ds), rank, world, self.shuffle_seed if world > 1 else None)
            # Workers start again each epoch (not persistent): a new iterator draws from torch's RNG as the main
            # process's does, so the epoch's shuffle, and the run, are the same with or without workers (tested).
            loader = ResumableLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                                     collate_fn=as_batch)  # fmt: skip
        return loader

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the data: the DDP shuffle's seed (nothing for one process)."""
        return {} if self.shuffle_seed is None else {"shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state: dict) -> None:
        self.shuffle_seed = state.get("shuffle_seed")

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
        # Its own generator: every pass of a DataLoader draws a seed, and scoring must not move the training's random
        # draws (a run stopped by trainer.max_steps validates once more than one that went on, then resumes exactly)
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False, sampler=sampler, collate_fn=as_batch,
                          generator=torch.Generator())  # fmt: skip

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        x, y = batch
        return encode_inputs(x, self.encoding, len(self.vocab)), y
