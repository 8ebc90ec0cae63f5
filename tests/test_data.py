import pytest
import torch

from charlstm.core.errors import CorpusError
from charlstm.core.net import encode_inputs
from charlstm.data.windows import StreamDataset, WindowDataset
from charlstm.training.datamodule import CharDataModule, split_ids

IDS = torch.arange(20, dtype=torch.uint8)


def test_windows_last_target_is_next_char():
    ds = WindowDataset(IDS, seq_len=5, stride=1, targets="last")
    assert len(ds) == 15  # starts 0..14: the window 14..18 predicts 19
    x, y = ds.__getitems__([0, 3, 14])
    assert x.dtype == torch.long and x.shape == (3, 5) and y.shape == (3,)
    assert x[1].tolist() == [3, 4, 5, 6, 7] and y[1].item() == 8
    assert x[2].tolist() == [14, 15, 16, 17, 18] and y[2].item() == 19
    x0, y0 = ds[0]
    assert x0.tolist() == [0, 1, 2, 3, 4] and y0.item() == 5
    with pytest.raises(IndexError):
        ds[15]


def test_windows_all_targets_are_shifted_window():
    ds = WindowDataset(IDS, seq_len=4, targets="all")
    x, y = ds.__getitems__([2])
    assert x[0].tolist() == [2, 3, 4, 5]
    assert y[0].tolist() == [3, 4, 5, 6]


def test_windows_stride():
    ds = WindowDataset(IDS, seq_len=5, stride=3, targets="last")
    assert len(ds) == 5  # starts 0, 3, 6, 9, 12 (12..16 -> 17); 15 would need char 20
    x, y = ds.__getitems__(list(range(len(ds))))
    assert x[:, 0].tolist() == [0, 3, 6, 9, 12]
    assert y.tolist() == [5, 8, 11, 14, 17]


def test_windows_share_memory_with_the_corpus():
    ds = WindowDataset(IDS, seq_len=5)
    assert ds.ids.data_ptr() == IDS.data_ptr()  # no N x seq_len copy is made


def test_split_is_contiguous_and_no_window_crosses_it():
    train, val = split_ids(IDS, val_fraction=0.3, seq_len=5)
    assert train.tolist() == list(range(14)) and val.tolist() == list(range(14, 20))
    tx, ty = WindowDataset(train, 5).__getitems__(list(range(len(WindowDataset(train, 5)))))
    assert int(tx.max()) <= 13 and int(ty.max()) == 13  # training never sees a validation char
    vx, vy = WindowDataset(val, 5).__getitems__([0])
    assert vx[0].tolist() == [14, 15, 16, 17, 18] and vy.item() == 19


def test_split_too_short_is_a_clear_error():
    with pytest.raises(CorpusError, match=r"too short .*seq_len\+1=11"):
        split_ids(IDS, val_fraction=0.1, seq_len=10)


def test_streams_layout_and_order():
    ds = StreamDataset(IDS, batch_size=3, seq_len=2)
    # (20 - 1) // 3 = 6 chars per stream: stream b holds chars 6b .. 6b+5, targets one ahead
    batches = list(ds)
    assert len(batches) == len(ds) == 3
    x0, y0 = batches[0]
    assert x0.tolist() == [[0, 1], [6, 7], [12, 13]]
    assert y0.tolist() == [[1, 2], [7, 8], [13, 14]]
    x1, _ = batches[1]
    assert x1[:, 0].tolist() == [2, 8, 14]  # each row continues where it stopped


def test_encodings_shapes_and_values():
    ids = torch.tensor([[0, 1, 3]])
    norm = encode_inputs(ids, "normalized", 4)
    assert norm.shape == (1, 3, 1) and norm.dtype == torch.float32
    assert norm.flatten().tolist() == [0.0, 0.25, 0.75]  # id / vocab_size, the tutorial's input
    onehot = encode_inputs(ids, "onehot", 4)
    assert onehot.shape == (1, 3, 4) and onehot[0, 2].tolist() == [0, 0, 0, 1]
    emb = encode_inputs(ids, "embedding", 4)
    assert emb.dtype == torch.long and emb.tolist() == ids.tolist()


@pytest.mark.parametrize("encoding", ["normalized", "onehot", "embedding"])
@pytest.mark.parametrize("layout,targets", [("windows", "last"), ("windows", "all"), ("streams", "all")])
def test_datamodule_batches(tmp_path, text_file, encoding, layout, targets):
    path = text_file("When shall we three meet again\nIn thunder, lightning, or in rain?\n" * 20)
    dm = CharDataModule(source="file", path=str(path), data_dir=str(tmp_path), seq_len=10, layout=layout,
                        targets=targets, encoding=encoding, batch_size=4)  # fmt: skip
    dm.setup("fit")
    v = len(dm.vocab)
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    feat = {"normalized": (1,), "onehot": (v,), "embedding": ()}[encoding]
    assert x.shape == (4, 10, *feat)
    assert y.shape == ((4,) if layout == "windows" and targets == "last" else (4, 10))
    vx, vy = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert vy.dim() == 1 and vx.shape[1] == 10
    if encoding == "normalized":
        assert float(x.max()) < 1.0 and float(x.min()) >= 0.0


def test_datamodule_lowercases_and_counts_validation(tmp_path, text_file):
    path = text_file("ABCDEFGHIJ" * 10)
    dm = CharDataModule(source="file", path=str(path), data_dir=str(tmp_path), seq_len=5, val_fraction=0.2)
    dm.setup("fit")
    assert dm.vocab.chars == list("abcdefghij")
    assert len(dm.train_ids) == 80 and len(dm.val_ids) == 20
    assert len(dm.val_dataset()) == 15  # every val char after the first seq_len is predicted once
    dm2 = CharDataModule(source="file", path=str(path), data_dir=str(tmp_path), seq_len=5, val_fraction=0.2,
                         val_max_windows=4)  # fmt: skip
    dm2.setup("fit")
    assert len(dm2.val_dataset()) == 4


def test_under_ddp_each_rank_validates_its_own_share_and_every_window_once(tmp_path, text_file):
    from types import SimpleNamespace

    dm = CharDataModule(source="file", path=str(text_file("abcdefg" * 40)), data_dir=str(tmp_path), seq_len=5,
                        val_fraction=0.2, val_batch_size=4)  # fmt: skip
    n = len(dm.val_dataset())
    assert n % 2 == 1  # shares of unequal size: a padding sampler would repeat a window
    for loader in ("val_dataloader", "test_dataloader"):
        dm.test_ids = dm.val_ids  # a held-out test text is scored the same way
        shares = []
        for rank in (0, 1):
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
            shares.append(list(getattr(dm, loader)().sampler))
        assert sorted(shares[0] + shares[1]) == list(range(n)), loader


def test_under_ddp_each_rank_trains_on_its_share_of_rank_zeros_shuffle(tmp_path, text_file):
    from types import SimpleNamespace

    from charlstm.data.windows import ShuffledWindows

    dm = CharDataModule(source="file", path=str(text_file("abcdefg" * 400)), data_dir=str(tmp_path), seq_len=5,
                        batch_size=8)  # fmt: skip
    n, shares, sent = len(dm.train_dataset()), [], []
    for rank in (0, 1):
        torch.manual_seed(rank)  # an unseeded run: each rank's own draw differs, rank 0's is broadcast
        strategy = SimpleNamespace(broadcast=lambda obj, src: sent.append((obj, src)) or sent[0][0])
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=strategy)
        dm.shuffle_seed = None  # each rank is a process of its own, with a DataModule of its own
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, ShuffledWindows) and loader.batch_size == 8
        x, _ = next(iter(loader))
        first = next(iter(loader.sampler))  # the same epoch, the same order
        assert x.shape == (8, 5) and torch.equal(x[0], dm.train_ids[first : first + 5].long())
        shares.append(list(loader.sampler))
    assert sent[0][1] == 0 and sent[0][0] != sent[1][0]
    assert len(shares[0]) == len(shares[1]) == n // 2 + n % 2
    assert set(shares[0] + shares[1]) == set(range(n)) and shares[0] != shares[1]


def test_lightning_keeps_the_datamodules_samplers_under_ddp(make_cfg, monkeypatch):
    """DDP in one process: Lightning would put its DistributedSampler in the loaders it was given."""
    import pytorch_lightning as pl
    from torch.utils.data import DistributedSampler

    from charlstm.app.jobranks import DIST_ENV
    from charlstm.app.train import train
    from charlstm.data.windows import ShuffledWindows

    for name in DIST_ENV:  # what Lightning's launcher sets in this process: taken away again after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    cfg = make_cfg("trainer=ddp_cpu", "trainer.devices=1", "trainer.max_steps=1",
                   "trainer.limit_val_batches=1", "trainer.val_check_interval=1", "data.layout=windows")  # fmt: skip
    try:
        _, objects = train(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    trainer = objects.trainer
    assert trainer.world_size == 1 and isinstance(trainer.strategy, pl.strategies.DDPStrategy)
    assert isinstance(trainer.train_dataloader.sampler, ShuffledWindows)
    assert not isinstance(trainer.val_dataloaders.sampler, DistributedSampler)


def test_extra_plays_add_training_text_only(tmp_path):
    base = CharDataModule(data_dir=str(tmp_path), seq_len=50)
    base.setup("fit")
    more = CharDataModule(data_dir=str(tmp_path), seq_len=50, extra_plays=["othello"])
    more.setup("fit")
    # validation is Macbeth's own tail either way, encoded with each run's vocabulary
    assert more.vocab.decode(more.val_ids.long()) == base.vocab.decode(base.val_ids.long())
    assert len(more.train_ids) > len(base.train_ids) + 100_000
    # Macbeth's training split comes last, right before the validation split
    tail = more.vocab.decode(more.train_ids[-len(base.train_ids) :].long())
    assert tail == base.vocab.decode(base.train_ids.long())
    assert "othello" in more.vocab.decode(more.train_ids[:200_000].long())


def test_shuffled_windows_match_the_standard_shuffle_without_an_index_list():
    from torch.utils.data import BatchSampler, RandomSampler

    from charlstm.data.windows import ShuffledWindows

    torch.manual_seed(7)
    ours = list(BatchSampler(ShuffledWindows(103), 10, drop_last=False))
    torch.manual_seed(7)
    standard = list(BatchSampler(RandomSampler(range(103)), 10, drop_last=False))
    assert ours == standard and len(ours) == 11
    assert sorted(i for b in ours for i in b) == list(range(103))


# -- extra text: the play corpus's, never a user's file's; validation never in training ---------------------------


@pytest.mark.parametrize(
    ("value", "source", "play", "expected"),
    [
        ("auto", "file", "macbeth", []),
        ("auto", "play", "all", []),
        ("all", "play", "all", []),
        (None, "play", "macbeth", []),
        ("none", "play", "macbeth", []),
        ("hamlet", "file", "macbeth", ["hamlet"]),
        ("hamlet,othello", "file", "macbeth", ["hamlet", "othello"]),
        (["hamlet", "othello", "hamlet"], "file", "macbeth", ["hamlet", "othello"]),
        (["macbeth", "othello"], "play", "macbeth", ["othello"]),
    ],
)
def test_extra_play_names(value, source, play, expected):
    from charlstm.training.datamodule import extra_play_names

    assert extra_play_names(value, source, play) == expected


def test_extra_plays_auto_and_all_on_a_play_are_every_other_play():
    from charlstm.data.corpus import play_names
    from charlstm.training.datamodule import extra_play_names

    others = [n for n in play_names() if n != "macbeth"]
    assert extra_play_names("auto", "play", "macbeth") == extra_play_names("all", "play", "macbeth") == others
    assert extra_play_names("all", "file", "macbeth") == play_names()  # asked for explicitly: every play


@pytest.mark.parametrize("value", ["hamlett", ["othello", "hamlett"], "othello, hamlett"])
def test_a_bad_extra_play_name_names_the_key_and_the_valid_names(value):
    from charlstm.core.errors import ConfigError
    from charlstm.training.datamodule import extra_play_names

    with pytest.raises(ConfigError) as info:
        extra_play_names(value, "play", "macbeth")
    msg = str(info.value)
    assert msg.startswith("data.extra_plays names no play called 'hamlett'; use auto, all, none or play names from: ")
    assert "data.play" not in msg and "macbeth" in msg.split("from: ")[1].split(", ")


@pytest.mark.parametrize(
    ("vocab", "expected"),
    [
        (["a", "bc", "d"], "data.vocab element 'bc' is not a single character"),
        (["a", 12], "data.vocab element 12 is not a single character"),
        ("abc", "data.vocab='abc' is a string; give a list of single characters"),
        (["a", "b", "a"], "data.vocab lists 'a' twice"),
    ],
)
def test_a_bad_vocab_element_is_named(tmp_path, text_file, vocab, expected):
    from charlstm.core.errors import ConfigError

    dm = CharDataModule(source="file", path=str(text_file("abcd" * 50)), data_dir=str(tmp_path), seq_len=5,
                        vocab=vocab)  # fmt: skip
    with pytest.raises(ConfigError) as info:
        dm.load()
    assert str(info.value).startswith(expected)


def test_a_vocab_with_digits_as_hydra_reads_them(tmp_path, text_file):
    dm = CharDataModule(source="file", path=str(text_file("a1b2" * 50)), data_dir=str(tmp_path), seq_len=5,
                        vocab=["a", "b", 1, 2])  # fmt: skip
    assert dm.load().chars == ["a", "b", "1", "2"]


def _random_text(n: int, seed: int = 0) -> str:
    """Text without repeats longer than a few words, so a validation tail found in training means a leak."""
    gen = torch.Generator().manual_seed(seed)
    words = ["".join(chr(97 + int(c)) for c in torch.randint(26, (int(k),), generator=gen))
             for k in torch.randint(1, 9, (400,), generator=gen)]  # fmt: skip
    picks = torch.randint(len(words), (n // 4,), generator=gen).tolist()
    return " ".join(words[i] for i in picks)[:n] + "\n"


def _options(group: str) -> list[str]:
    from tests.conftest import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", _options("experiment"))
@pytest.mark.parametrize("data", _options("data"))
def test_validation_text_never_reaches_training(data, experiment, data_dir, tmp_path):
    """Every corpus x recipe: the validation tail is nowhere in the training ids (extra plays included)."""
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    path = tmp_path / "own.txt"
    path.write_text(_random_text(6000), encoding="utf-8")
    cfg = compose_cfg("train", [f"experiment={experiment}", f"data={data}", f"paths.data_dir={data_dir}",
                                "data.max_chars=4000", *([f"data.path={path}"] if data == "file" else [])])  # fmt: skip
    dm = instantiate(cfg.data, _convert_="all")
    dm.load()
    assert dm.train_ids.dtype == dm.val_ids.dtype == torch.uint8  # one byte per id: a byte search is an id search
    train, val = dm.train_ids.numpy().tobytes(), dm.val_ids.numpy().tobytes()
    assert len(val) >= 300 and val not in train
    assert val[:60] not in train  # not even the first 60 chars of it
    if data == "file":  # the recipe's extra plays belong to the play corpus: the file's own chars only
        assert set(dm.vocab.chars) == set(path.read_text(encoding="utf-8")[:4000])


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4099, 20_000])
def test_a_big_corpus_is_shuffled_in_constant_memory_every_window_once(n):
    from charlstm.data.windows import ShuffledWindows

    torch.manual_seed(3)
    flat = list(ShuffledWindows(n, exact_limit=0))  # the path a corpus of millions of windows takes
    assert len(flat) == len(ShuffledWindows(n, exact_limit=0)) == n
    assert sorted(flat) == list(range(n))  # a permutation: every window once per epoch
    if n >= 1000:
        assert flat[:50] != list(range(50))  # and shuffled: not in order
        torch.manual_seed(3)
        assert list(ShuffledWindows(n, exact_limit=0)) == flat  # seeded by torch's RNG
        assert list(ShuffledWindows(n, exact_limit=0)) != flat  # a new order each epoch


@pytest.mark.parametrize("exact_limit", [1 << 24, 0])
@pytest.mark.parametrize(("n", "world"), [(1000, 2), (1001, 3), (20_001, 4), (2, 3)])
def test_ddp_ranks_share_one_shuffle_each_window_once_and_as_many_steps(n, world, exact_limit):
    from charlstm.data.windows import ShuffledWindows

    def shares(epoch: int, seed: int = 11) -> list[list[int]]:
        out = []
        for rank in range(world):
            torch.manual_seed(rank)  # unseeded ranks' RNGs differ: the order must come from the shared seed alone
            sampler = ShuffledWindows(n, rank, world, seed=seed, exact_limit=exact_limit)
            sampler.set_epoch(epoch)
            out.append(list(sampler))
        return out

    first = shares(0)
    per_rank = -(-n // world)
    assert [len(s) for s in first] == [per_rank] * world  # every rank takes the same number of steps
    seen = [i for s in first for i in s]
    assert sorted(set(seen)) == list(range(n))  # every window read in the epoch
    assert len(seen) - n == per_rank * world - n < world  # repeats only to even out the shares, as DDP pads
    assert shares(0) == first  # one seed and epoch, one order: ranks and restarts agree
    if n > 100:
        assert shares(1) != first and {i for s in shares(1) for i in s} == set(seen)
        assert first[0][:20] != sorted(first[0][:20])  # shuffled within a rank, too


def test_a_test_split_is_held_out_before_the_validation_tail(tmp_path, text_file):
    path = text_file("".join(chr(97 + (i * 7) % 26) for i in range(1000)))
    plain = CharDataModule(source="file", path=str(path), data_dir=str(tmp_path), seq_len=5, val_fraction=0.1)
    plain.load()
    held = CharDataModule(source="file", path=str(path), data_dir=str(tmp_path), seq_len=5, val_fraction=0.1,
                          test_fraction=0.2)  # fmt: skip
    held.load()
    assert plain.test_ids is None and len(held.test_ids) == 200
    assert torch.equal(held.val_ids, plain.val_ids)  # the validation text is the same with or without a test text
    assert torch.equal(torch.cat([held.train_ids, held.test_ids]), plain.train_ids)  # taken from training's tail
    assert len(held.test_dataset()) == 200 - 5  # every test char after the first val_context
    with pytest.raises(CorpusError, match=r"too short for a test window .* data.test_fraction=0.001"):
        CharDataModule(source="file", path=str(path), data_dir=str(tmp_path), seq_len=5, test_fraction=0.001).load()
