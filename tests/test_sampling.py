"""The generator: seeds, greedy = argmax in both modes, stateful vs window contexts, top-k / top-p, prompts."""

from __future__ import annotations

import math

import pytest
import torch

from charlstm.core.errors import ConfigError, VocabError
from charlstm.core.net import ENCODINGS, CharLSTM, encode_inputs
from charlstm.core.sampling import Generator, _Noise, _Sampler, filter_logits
from charlstm.core.vocab import CharVocab

VOCAB = CharVocab(list("\n !',.:;?abcdefghijklmnopqrstuvwxyz"))
SEQ_LEN = 8


def make_generator(encoding: str = "normalized", units: int = 24, layers: int = 2, memory: float = 3.0) -> Generator:
    """An untrained model whose forget gates start open (bias ``memory``), so early chars still matter later."""
    torch.manual_seed(0)
    net = CharLSTM(len(VOCAB), units, layers, 0.2, encoding, embed_dim=8)
    with torch.no_grad():
        for k in range(layers):
            getattr(net.lstm, f"bias_hh_l{k}")[units : 2 * units] += memory
            getattr(net.lstm, f"weight_hh_l{k}").mul_(2.0)
    return Generator(net, VOCAB, encoding, SEQ_LEN, lowercase=True)


@pytest.fixture(scope="module", params=ENCODINGS)
def gen(request) -> Generator:
    return make_generator(request.param)


def probs_of(gen: Generator, text: str) -> torch.Tensor:
    """Reference: the network's plain forward over ``text`` from a zero state; the next-char distribution."""
    with torch.no_grad():
        x = encode_inputs(VOCAB.encode(text)[None], gen.encoding, len(VOCAB))
        logits, _ = gen.net.eval()(x, None, last_only=True)
    return torch.softmax(logits[0], -1)


def greedy_reference(gen: Generator, prompt: str, length: int, window: int | None) -> str:
    """The tutorial's loop, written plainly: argmax of the forward over the history (or its last ``window``)."""
    text = prompt
    for _ in range(length):
        context = text[-window:] if window else text
        text += VOCAB.chars[int(probs_of(gen, context).argmax())]
    return text[len(prompt) :]


# -- seeds ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stateful", "window"])
def test_same_seed_same_text_and_different_seeds_differ(gen, mode):
    kwargs = dict(length=60, temperature=1.0, num_samples=3, mode=mode)
    first = gen.generate("the king", seed=7, **kwargs)
    assert gen.generate("the king", seed=7, **kwargs) == first
    assert len(first) == 3 and all(len(t) == 60 for t in first)
    assert len(set(first)) == 3  # the samples of one batch differ from each other
    others = [gen.generate("the king", seed=s, **kwargs) for s in (8, 9)]
    assert all(o != first for o in others) and others[0] != others[1]


def test_same_seed_same_text_with_top_k_top_p_and_no_prompt(gen):
    for kwargs in ({"top_k": 5}, {"top_p": 0.9}, {"top_k": 10, "top_p": 0.8}):
        a = gen.generate("", 40, 0.9, seed=3, num_samples=2, **kwargs)
        assert a == gen.generate("", 40, 0.9, seed=3, num_samples=2, **kwargs)
        assert a != gen.generate("", 40, 0.9, seed=4, num_samples=2, **kwargs)


def test_the_text_does_not_depend_on_the_thread_count():
    gen = make_generator()
    before = torch.get_num_threads()
    try:
        texts = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            texts[threads] = gen.generate("so fair", 50, 0.8, num_samples=5, seed=11)
            assert torch.get_num_threads() == threads  # left as it was
    finally:
        torch.set_num_threads(before)
    assert texts[1] == texts[2] == texts[3]


def test_generation_leaves_global_rng_training_mode_and_onednn_alone():
    gen = make_generator()
    gen.net.train()
    state = torch.get_rng_state()
    onednn = torch.backends.mkldnn.enabled
    seen = []
    gen.generate("abc", 20, 0.8, seed=1, on_chars=lambda chars: seen.append(torch.backends.mkldnn.enabled))
    gen.generate("", 20, 0.8, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert gen.net.training
    assert torch.backends.mkldnn.enabled == onednn and seen == [False] * 20  # off while generating on a CPU only


# -- greedy is argmax ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stateful", "window"])
def test_temperature_zero_is_the_argmax_of_the_plain_forward(gen, mode):
    prompt = "thou art"
    expected = greedy_reference(gen, prompt, 30, SEQ_LEN if mode == "window" else None)
    assert gen.generate(prompt, 30, temperature=0.0, mode=mode) == [expected]
    # greedy ignores the seed and is the same for every sample of a batch
    assert gen.generate(prompt, 30, 0.0, seed=5, num_samples=3, mode=mode) == [expected] * 3


@pytest.mark.parametrize("mode", ["stateful", "window"])
def test_top_k_1_is_greedy(gen, mode):
    greedy = gen.generate("out, damned", 40, 0.0, mode=mode)
    for seed in (0, 1):
        assert gen.generate("out, damned", 40, 1.5, top_k=1, seed=seed, mode=mode) == greedy


def test_a_tiny_top_p_is_greedy(gen):
    greedy = gen.generate("fair is foul", 40, 0.0)
    assert gen.generate("fair is foul", 40, 1.0, top_p=1e-6, seed=2) == greedy


# -- stateful vs window ----------------------------------------------------------------------------------------


def test_stateful_sees_the_whole_history_and_window_the_last_seq_len_chars(gen):
    """Both modes against the plain forward: stateful over everything, window over the last SEQ_LEN chars."""
    prompt, cont = "when shall we", " three meet again"
    stateful = gen.distributions(prompt, cont, "stateful")
    window = gen.distributions(prompt, cont, "window")
    for i in range(len(cont) + 1):
        seen = prompt + cont[:i]
        torch.testing.assert_close(stateful[i], probs_of(gen, seen), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(window[i], probs_of(gen, seen[-SEQ_LEN:]), atol=1e-5, rtol=1e-4)


def test_modes_agree_while_the_context_fits_the_window(gen):
    """A prompt of k <= seq_len chars: the distributions after prompt + i fed chars are the same in both modes
    while k + i <= seq_len, because the window then holds the whole history."""
    for prompt in ("a", "fair", "fair is"):
        cont = "abcdefghijkl"
        stateful = gen.distributions(prompt, cont, "stateful")
        window = gen.distributions(prompt, cont, "window")
        fits = SEQ_LEN - len(prompt) + 1  # rows whose context has at most SEQ_LEN chars
        torch.testing.assert_close(stateful[:fits], window[:fits], atol=1e-5, rtol=1e-4)


def test_after_a_prompt_of_exactly_seq_len_chars_modes_agree_on_the_first_char_then_differ(gen):
    """The first prediction sees the same SEQ_LEN chars in both modes (the same computation: bit for bit); from
    the second on, window has dropped the oldest char while stateful still carries it."""
    prompt, cont = "macbeth!", "doth murder sleep"
    assert len(prompt) == SEQ_LEN
    stateful = gen.distributions(prompt, cont, "stateful")
    window = gen.distributions(prompt, cont, "window")
    assert torch.equal(stateful[0], window[0])
    gaps = (stateful[1:] - window[1:]).abs().max(dim=1).values
    assert bool((gaps > 1e-4).all()), gaps


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_one_and_three_layers_every_encoding(encoding):
    for layers in (1, 3):
        gen = make_generator(encoding, units=12, layers=layers)
        text = "the thane of cawdor"
        probs = gen.distributions(text[:5], text[5:], "stateful")
        torch.testing.assert_close(probs[-1], probs_of(gen, text), atol=1e-5, rtol=1e-4)


def test_a_long_prompt_is_primed_in_chunks(monkeypatch):
    import charlstm.core.sampling as sampling

    gen = make_generator()
    prompt = "tomorrow, and tomorrow, and tomorrow, creeps in this petty pace"
    whole = gen.distributions(prompt, "from", "stateful")
    monkeypatch.setattr(sampling, "PRIME_CHUNK", 7)
    torch.testing.assert_close(gen.distributions(prompt, "from", "stateful"), whole, atol=1e-6, rtol=1e-5)


# -- the sampler -------------------------------------------------------------------------------------------------


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(filter_logits(logits, top_p=p)).nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.3) == {1}
    assert kept(0.5) == {1}
    assert kept(0.79) == {1, 3}
    assert kept(0.8) == {1, 3}  # 0.5 + 0.3 reaches 0.8 exactly: the third char is not needed
    assert kept(0.81) == {1, 3, 2}
    assert kept(0.96) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}


def test_top_k_keeps_the_k_largest_and_combines_with_top_p():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).nonzero()[:, 1].tolist() == [1, 2]
    assert torch.isfinite(filter_logits(logits, top_k=0)).all()
    assert torch.isfinite(filter_logits(logits, top_k=9)).all()
    # top-p looks at the probabilities renormalised over the top-k: 0.665 for the best of the three kept
    # (0.636 over all five, which would not reach 0.65)
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.65)).nonzero()[:, 1].tolist() == [1]
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.7)).nonzero()[:, 1].tolist() == [1, 2]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    """The Gumbel-max draw is exact: 20,000 draws match softmax(logits / T) within sampling error."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows, steps = 2000, 10
    gen = torch.Generator().manual_seed(0)
    noise = _Noise(rows, len(logits), gen, torch.device("cpu"))
    pick = _Sampler(temperature, 0, 1.0, len(logits), noise)
    out = torch.empty(rows, dtype=torch.long)
    counts = torch.zeros(len(logits))
    for t in range(steps):
        pick(t, logits.expand(rows, -1), out)
        counts += torch.bincount(out, minlength=len(logits))
    freq = counts / (rows * steps)
    expected = torch.softmax(logits / temperature, -1)
    sigma = (expected * (1 - expected) / (rows * steps)).sqrt()
    assert bool(((freq - expected).abs() <= 5 * sigma + 1e-4).all()), (freq, expected)


def test_filtered_chars_are_never_sampled():
    gen = make_generator()
    logits_probe = gen.distributions("to be", "")[0]
    allowed = set(logits_probe.topk(3).indices.tolist())
    texts = gen.generate("to be", 1, 5.0, top_k=3, num_samples=200, seed=0)
    assert {VOCAB.index[t] for t in texts} <= allowed
    assert len({VOCAB.index[t] for t in texts}) == 3  # a high temperature reaches all three


# -- prompts -------------------------------------------------------------------------------------------------------


def test_unknown_chars_raise_one_line_listing_them():
    gen = make_generator()
    with pytest.raises(VocabError) as info:
        gen.generate("Hail, king 2 & 3 #", 10)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (
        "the prompt has 4 character(s) the model's vocabulary lacks: '#', '&', '2', '3'; "
        "remove them or pass unknown=skip to drop them"
    )


def test_unknown_skip_drops_them_and_the_prompt_is_lowercased():
    gen = make_generator()
    assert gen.clean_prompt("Hail, KING 2&3!", unknown="skip") == "hail, king !"
    skipped = gen.generate("Hail, KING 2&3!", 20, 0.0, unknown="skip")
    assert skipped == gen.generate("hail, king !", 20, 0.0)
    gen.lowercase = False
    with pytest.raises(VocabError, match=r"'H', 'I', 'K', 'N'"):
        gen.generate("Hail, KING", 5)


def test_an_empty_prompt_starts_from_a_seeded_random_vocabulary_char():
    gen = make_generator()
    starts = [gen.generate("", 1, 0.8, seed=s)[0] for s in range(30)]
    assert all(ch in VOCAB.index for ch in starts)
    assert len(set(starts)) > 5
    assert starts == [gen.generate("", 1, 0.8, seed=s)[0] for s in range(30)]
    # the first char counts in the length; greedy goes on from it
    text = gen.generate("", 12, 0.0, seed=4)[0]
    assert len(text) == 12 and text[1:] == greedy_reference(gen, text[0], 11, None)


def test_length_zero_and_the_chars_callback():
    gen = make_generator()
    assert gen.generate("abc", 0, num_samples=2) == ["", ""]
    seen: list[list[str]] = []
    text = gen.generate("abc", 15, 0.8, num_samples=2, seed=1, on_chars=seen.append)
    assert ["".join(step[i] for step in seen) for i in range(2)] == text
    assert text == gen.generate("abc", 15, 0.8, num_samples=2, seed=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"length": -1}, "length=-1 is not allowed: it must be an integer >= 0"),
        ({"temperature": -0.5}, "temperature=-0.5 is not allowed: it must be a number >= 0 (0 is greedy argmax)"),
        ({"temperature": math.nan}, "temperature=nan is not allowed"),
        ({"top_k": -2}, "top_k=-2 is not allowed"),
        ({"top_p": 0.0}, "top_p=0.0 is not allowed: it must be a number with 0 < top_p <= 1"),
        ({"top_p": 1.5}, "top_p=1.5 is not allowed"),
        ({"num_samples": 0}, "num_samples=0 is not allowed: it must be an integer >= 1"),
        ({"mode": "sliding"}, "mode='sliding' is not allowed: it must be stateful or window"),
        ({"unknown": "keep"}, "unknown='keep' is not allowed: it must be error or skip"),
    ],
)
def test_bad_options_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as info:
        make_generator().generate("abc", **{"length": 5, **kwargs})
    assert str(info.value).startswith(message)
