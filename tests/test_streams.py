"""The streams layout (truncated BPTT) and the headline metric, checked against hand computations."""

import math

import pytorch_lightning as pl
import torch

from charlstm.core.net import encode_inputs
from charlstm.data.windows import StreamDataset
from charlstm.training.datamodule import CharDataModule
from charlstm.training.model import CharLSTMModule

TEXT = "Is this a dagger which I see before me,\nThe handle toward my hand? Come, let me clutch thee.\n" * 6


def _datamodule(tmp_path, text_file, **kw):
    path = text_file(TEXT)
    args = dict(source="file", path=str(path), data_dir=str(tmp_path), seq_len=7, layout="streams",
                encoding="onehot", batch_size=4, val_fraction=0.2)  # fmt: skip
    args.update(kw)
    dm = CharDataModule(**args)
    dm.setup("fit")
    return dm


def _trainer(**kw):
    args = dict(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    args.update(kw)
    return pl.Trainer(**args)


def test_streams_cover_every_training_char_once_in_order():
    ids = torch.arange(103)
    ds = StreamDataset(ids, batch_size=4, seq_len=6)
    rows = [[] for _ in range(4)]
    targets = [[] for _ in range(4)]
    for x, y in ds:
        for b in range(4):
            rows[b] += x[b].tolist()
            targets[b] += y[b].tolist()
    length = (103 - 1) // 4  # 25 chars per stream
    for b in range(4):
        assert rows[b] == list(range(b * length, (b + 1) * length))  # contiguous, in order
        assert targets[b] == [i + 1 for i in rows[b]]
    seen = sorted(i for r in rows for i in r)
    assert seen == list(range(4 * length))  # every char once; only the 2 tail chars are dropped


def test_streams_give_each_ddp_rank_its_own_text():
    ids = torch.arange(200)
    r0 = torch.cat([x for x, _ in StreamDataset(ids, 2, 5, rank=0, world_size=2)], 1)
    r1 = torch.cat([x for x, _ in StreamDataset(ids, 2, 5, rank=1, world_size=2)], 1)
    assert int(r0.max()) < 100 <= int(r1.min())
    assert len(StreamDataset(ids, 2, 5, 0, 2)) == len(StreamDataset(ids, 2, 5, 1, 2))


class _Spy(pl.Callback):
    """Records the state each training step starts from and the state it leaves."""

    def __init__(self):
        self.calls = []  # (epoch, batch_idx, state_in, state_out)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        s = module._train_state
        self._in = None if s is None else (s[0].clone(), s[1].clone(), s[0].requires_grad, s[0].grad_fn)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        s = module._train_state
        self.calls.append((trainer.current_epoch, batch_idx, self._in, (s[0].clone(), s[1].clone())))


def test_hidden_state_is_carried_detached_and_reset_each_epoch(tmp_path, text_file):
    dm = _datamodule(tmp_path, text_file)
    model = CharLSTMModule(vocab=dm.vocab.to_list(), encoding="onehot", units=8, layers=2, seq_len=7,
                           layout="streams")  # fmt: skip
    spy = _Spy()
    _trainer(callbacks=[spy], limit_val_batches=0).fit(model, datamodule=dm)
    n = len(dm.train_dataset())
    assert len(spy.calls) == 2 * n
    for i, (_, batch_idx, state_in, _) in enumerate(spy.calls):
        if batch_idx == 0:
            assert state_in is None, "state must be reset at the start of every epoch"
            continue
        h, c, requires_grad, grad_fn = state_in
        prev_h, prev_c = spy.calls[i - 1][3]
        assert torch.equal(h, prev_h) and torch.equal(c, prev_c), "state must carry over between batches"
        assert not requires_grad and grad_fn is None, "no gradient may flow across a batch boundary"


def test_no_gradient_crosses_batch_boundaries():
    torch.manual_seed(0)
    module = CharLSTMModule(vocab=list("abcde"), encoding="onehot", units=6, layers=1, dropout=0.0,
                            layout="streams")  # fmt: skip
    x1, x2 = (encode_inputs(torch.randint(5, (2, 4)), "onehot", 5) for _ in range(2))
    x1.requires_grad_(True)
    module._train_state = None
    module.training_step((x1, torch.randint(5, (2, 4))), 0)
    loss2 = module.training_step((x2, torch.randint(5, (2, 4))), 1)
    loss2.backward()
    assert x1.grad is None  # the second batch's loss does not reach the first batch's inputs


def test_val_bpc_equals_hand_computation(tmp_path, text_file):
    dm = _datamodule(tmp_path, text_file, layout="windows", encoding="normalized", val_context=5)
    torch.manual_seed(0)
    model = CharLSTMModule(vocab=dm.vocab.to_list(), encoding="normalized", units=5, layers=1, seq_len=7)
    metrics = _trainer().validate(model, datamodule=dm, verbose=False)[0]

    net = model.net.eval()
    val, v = dm.val_ids.long(), len(dm.vocab)
    nats = []
    with torch.no_grad():
        for p in range(5, len(val)):
            window = val[p - 5 : p]
            logits, _ = net((window.float() / v).view(1, 5, 1))
            nats.append(-torch.log_softmax(logits[0, -1], -1)[val[p]].item())
    expected = sum(nats) / len(nats)
    assert math.isclose(metrics["val/loss"], expected, rel_tol=1e-5)
    assert math.isclose(metrics["val/bpc"], expected / math.log(2), rel_tol=1e-5)
    assert math.isclose(metrics["val/ppl"], math.exp(expected), rel_tol=1e-5)
