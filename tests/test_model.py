import pytest
import torch

from charlstm.core.net import CharLSTM, encode_inputs
from charlstm.training.model import CharLSTMModule, lr_factor


@pytest.mark.parametrize("encoding", ["normalized", "onehot", "embedding"])
def test_output_shapes(encoding):
    net = CharLSTM(vocab_size=11, units=8, layers=3, dropout=0.1, encoding=encoding, embed_dim=5).eval()
    ids = torch.randint(11, (4, 7))
    logits, (h, c) = net(encode_inputs(ids, encoding, 11))
    assert logits.shape == (4, 7, 11)
    assert h.shape == c.shape == (3, 4, 8)
    last, _ = net(encode_inputs(ids, encoding, 11), last_only=True)
    assert last.shape == (4, 11)
    torch.testing.assert_close(last, logits[:, -1])


def test_tutorial_architecture():
    """LSTM(300) -> Dropout(0.2) -> LSTM(300) -> Dropout(0.2) -> Dense(vocab) over one scalar input."""
    net = CharLSTM(vocab_size=38, units=300, layers=2, dropout=0.2, encoding="normalized")
    assert net.lstm.input_size == 1 and net.lstm.hidden_size == 300 and net.lstm.num_layers == 2
    assert net.lstm.dropout == 0.2 and net.drop.p == 0.2
    assert net.head.in_features == 300 and net.head.out_features == 38
    assert net.embed is None


def test_state_is_carried():
    net = CharLSTM(vocab_size=5, units=6, layers=1, dropout=0.0, encoding="onehot").eval()
    x = encode_inputs(torch.randint(5, (2, 8)), "onehot", 5)
    full, _ = net(x)
    first, state = net(x[:, :5])
    rest, _ = net(x[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, rest], 1), full)


def test_module_hparams_are_primitives():
    m = CharLSTMModule(vocab=list("abc"), units=4, layers=1)
    for v in m.hparams.values():
        assert v is None or isinstance(v, str | int | float | bool | list)
    assert m.hparams.vocab == ["a", "b", "c"]


def test_loss_is_cross_entropy_of_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([0])
    expected = -torch.log(torch.softmax(logits, -1)[0, 0])
    torch.testing.assert_close(CharLSTMModule.loss_sum(logits, y), expected)


def test_lr_factor_warmup_and_cosine():
    assert lr_factor(0, 100, 10, 0.0, True) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.0, True) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1, True) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1, True) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, 0.0, True) == pytest.approx(0.5)
    assert lr_factor(50, 100, 0, 0.0, False) == 1.0


def test_fused_optimizer_is_clipped_by_norm_without_lightning():
    m = CharLSTMModule(vocab=list("abc"), units=4, layers=1)
    opt = torch.optim.AdamW(m.parameters(), fused=True)
    for p in m.parameters():
        p.grad = torch.full_like(p, 3.0)
    m.configure_gradient_clipping(opt, 0.5, "norm")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in m.parameters()]))
    assert norm.item() == pytest.approx(0.5, rel=1e-4)
    m.configure_gradient_clipping(opt, 0.01, "value")
    assert max(p.grad.abs().max().item() for p in m.parameters()) == pytest.approx(0.01)


def test_trainer_of_a_module_on_its_own_is_none_and_the_attached_one_otherwise():
    import pytorch_lightning as pl

    from charlstm.training.datamodule import trainer_of

    m = CharLSTMModule(vocab=list("abc"), units=4, layers=1)
    assert trainer_of(m) is None
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    m.trainer = trainer
    assert trainer_of(m) is trainer
