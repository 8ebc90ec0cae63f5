"""Text generation from a trained CharLSTM: prime the LSTM with the prompt once, then one step per char carrying
(h, c) (``mode='stateful'``), or the tutorial's re-feed of the last ``seq_len`` chars from a zero state
(``mode='window'``). Greedy (``temperature=0``), temperature, top-k and top-p; several samples run as one batch."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator

import torch

from charlstm.core import checkpoint
from charlstm.core.errors import ConfigError
from charlstm.core.hardware import check_fits
from charlstm.core.net import CharLSTM, encode_inputs, sequence_bytes
from charlstm.core.rules import INT_GE0, INT_GE1, Rule, check_values
from charlstm.core.vocab import CharVocab, unknown_chars

MODES = ("stateful", "window")
UNKNOWN = ("error", "skip")
PRIME_CHUNK = 4096  # prompt chars per LSTM call while priming: a long prompt file needs no T x units output at once
NOISE_FLOATS = 1 << 20  # sampling noise is drawn for many steps at once, up to this many floats


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits and the smallest set whose probability reaches ``top_p``; -inf the rest."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# The generation settings; generate.py checks the same keys in its config with these rules.
SAMPLING_RULES: dict[str, Rule] = {
    "length": INT_GE0,
    "temperature": ("float", lambda v: v >= 0, "a number >= 0 (0 is greedy argmax)"),
    "top_k": ("int", lambda v: v >= 0, "an integer >= 0 (0 keeps every char)"),
    "top_p": ("float", lambda v: 0 < v <= 1, "a number with 0 < top_p <= 1 (1 keeps every char)"),
    "num_samples": INT_GE1,
    "mode": ("choice", MODES, "stateful or window"),
    "unknown": ("choice", UNKNOWN, "error or skip"),
}


def check_options(
    length: int, temperature: float, top_k: int, top_p: float, num_samples: int, mode: str, unknown: str
) -> None:
    """The generation settings of a direct caller, checked before any work by :data:`SAMPLING_RULES`."""
    check_values(dict(length=length, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples,
                      mode=mode, unknown=unknown), SAMPLING_RULES)  # fmt: skip


class _Noise:
    """Gumbel(0, 1) noise for every sample, drawn ``steps`` steps at a time, in place, from the seeded generator."""

    def __init__(self, batch: int, vocab_size: int, gen: torch.Generator, device: torch.device) -> None:
        self.steps = max(1, min(256, NOISE_FLOATS // (batch * vocab_size)))
        self.buf = torch.empty(self.steps, batch, vocab_size, device=device)
        self.gen = gen
        self.refill()

    def refill(self) -> None:
        # -log(Exp(1)) is Gumbel(0, 1); the clamp keeps a (vanishingly rare) zero draw finite
        self.buf.exponential_(generator=self.gen).clamp_(min=1e-30).log_().neg_()


class _Sampler:
    """Writes the next ids of the batch: argmax when greedy, else argmax(logits / T + Gumbel noise), which is an
    exact draw from softmax(logits / T) (the Gumbel-max trick). Two tensor ops per step, no allocation; the noise is
    refilled when used up."""

    def __init__(self, temperature: float, top_k: int, top_p: float, vocab_size: int, noise: _Noise | None) -> None:
        self.greedy = noise is None
        self.inv_t = 1.0 / temperature if temperature else 0.0
        self.top_k, self.top_p = top_k, top_p
        self.filtering = 0 < top_k < vocab_size or top_p < 1.0
        if noise is not None:
            self.rows = noise.buf.unbind(0)  # views made once, refilled in place
            self.refill = noise.refill
            self.scores = torch.empty(noise.buf.shape[1:], device=noise.buf.device)

    def __call__(self, t: int, logits: torch.Tensor, out: torch.Tensor) -> None:
        if self.greedy:
            torch.argmax(logits, 1, out=out)
            return
        j = t % len(self.rows)
        if j == 0 and t:
            self.refill()
        if self.filtering:
            torch.add(filter_logits(logits * self.inv_t, self.top_k, self.top_p), self.rows[j], out=self.scores)
        else:
            torch.add(self.rows[j], logits, alpha=self.inv_t, out=self.scores)
        torch.argmax(self.scores, 1, out=out)


class _Forced:
    """Feeds a fixed continuation instead of sampling and records each step's next-char distribution."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.probs = ids, []

    def __call__(self, t: int, logits: torch.Tensor, out: torch.Tensor) -> None:
        self.probs.append(torch.softmax(logits[0].float(), -1))
        out.fill_(int(self.ids[t]) if t < len(self.ids) else 0)


@contextlib.contextmanager
def _native_lstm(device: torch.device) -> Iterator[None]:
    """On a CPU, ``nn.LSTM`` without oneDNN while generating: a oneDNN LSTM call sets its kernel up each time, so one
    char of 2 x 300 units took ~2.3 ms with it and ~0.5 ms without (benchmarks/results/machinery.md)."""
    if device.type != "cpu":
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


class Generator:
    """Generates text from a trained CharLSTM; everything it needs travels in the checkpoint."""

    def __init__(
        self, net: CharLSTM, vocab: CharVocab, encoding: str, seq_len: int, lowercase: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:  # fmt: skip
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.vocab, self.encoding, self.seq_len, self.lowercase = vocab, encoding, seq_len, lowercase

    @classmethod
    def from_module(cls, module, device: str | torch.device | None = None) -> Generator:
        """A generator over a CharLSTMModule's live network (e.g. during training)."""
        hp = module.hparams
        return cls(module.net, CharVocab(hp.vocab), hp.encoding, hp.seq_len, hp.lowercase,
                   device or module.device)  # fmt: skip

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Generator:
        """Load a checkpoint safely (``weights_only=True``); needs nothing but the file."""
        ckpt = checkpoint.load(path)
        net = checkpoint.build_net(ckpt, path)
        hp = ckpt["hyper_parameters"]
        return cls(net, CharVocab(hp["vocab"]), hp["encoding"], hp["seq_len"], bool(hp.get("lowercase", False)),
                   device)  # fmt: skip

    def clean_prompt(self, prompt: str, unknown: str = "error") -> str:
        """The prompt as the model reads it: lowercased when it was trained lowercase; characters the vocabulary
        lacks raise one VocabError that lists them, or are dropped with ``unknown='skip'``."""
        if self.lowercase:
            prompt = prompt.lower()
        missing = sorted(set(prompt) - set(self.vocab.chars))
        if not missing:
            return prompt
        if unknown == "skip":
            gone = set(missing)
            return "".join(ch for ch in prompt if ch not in gone)
        raise unknown_chars(missing, "the prompt")

    def _ids(self, text: str) -> torch.Tensor:
        return self.vocab.encode(text).to(self.device)

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        return encode_inputs(ids, self.encoding, len(self.vocab))

    def _prime(self, ids: torch.Tensor, state=None):
        """Run 1-D ``ids`` through the network as one sequence (in chunks); the last logits (1, V) and (h, c)."""
        for start in range(0, len(ids), PRIME_CHUNK):
            logits, state = self.net(self._encode(ids[None, start : start + PRIME_CHUNK]), state, last_only=True)
        return logits, state

    def _window(self, history: torch.Tensor) -> torch.Tensor:
        """The tutorial's step: the last ``seq_len`` chars (all of them when fewer) from a zero state."""
        logits, _ = self.net(self._encode(history[-self.seq_len :].t()), None, last_only=True)
        return logits

    @contextlib.contextmanager
    def _generating(self) -> Iterator[None]:
        """The network in eval mode without autograd (and, on a CPU, without oneDNN), as it was afterwards."""
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.inference_mode(), _native_lstm(self.device):
                yield
        finally:
            self.net.train(was_training)

    def _run(
        self, prompt_ids: torch.Tensor, length: int, batch: int, mode: str, pick: Callable,
        gen: torch.Generator, on_ids: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The generation loop; returns the ids (length, batch). ``pick(t, logits, out)`` writes step t's ids.

        Stateful: the network's own forward, one char per step, carrying (h, c), as PyTorch's word_language_model
        generates. A hand-written step (gates fused into one sigmoid) was at most 1.5x faster (8 samples, 0.8x for
        one), and threads splitting the batch behind a barrier never faster here (benchmarks/results/machinery.md).
        """
        n = len(prompt_ids)
        buf = torch.empty(n + length, batch, dtype=torch.long, device=self.device)
        buf[:n] = prompt_ids[:, None]
        out = buf[n:]
        if length == 0:
            return out
        if not n:
            # no prompt: each sample starts from a random vocabulary char (the seed decides which)
            out[0] = torch.randint(len(self.vocab), (batch,), generator=gen, device=self.device)
        stateful = mode == "stateful"
        state = None
        if n:
            # every sample shares the prompt: prime once with batch 1, then broadcast
            logits, (h, c) = self._prime(prompt_ids if stateful else prompt_ids[-self.seq_len :])
            pick(0, logits.expand(batch, -1), out[0])
            state = h.expand(-1, batch, -1).contiguous(), c.expand(-1, batch, -1).contiguous()
        if on_ids is not None:
            on_ids(out[0])
        for t in range(1, length):
            if stateful:
                logits, state = self.net(self._encode(out[t - 1, :, None]), state, last_only=True)
            else:
                logits = self._window(buf[: n + t])
            pick(t, logits, out[t])
            if on_ids is not None:
                on_ids(out[t])
        return out

    def sample_bytes(self, prompt_chars: int, length: int, mode: str) -> int:
        """A lower bound of the memory one sample of a batch needs: its ids (int64) and their Python list, its text,
        its state, gates and logits while stepping (in window mode its window through the LSTM)."""
        net = self.net
        ids = (prompt_chars + 2 * length) * 8 + length
        state = (2 * net.layers * net.units + 5 * net.units + net.vocab_size) * 4
        if mode == "window":
            state += sequence_bytes(net, self.seq_len, 1, training=False)
        return ids + state

    def _seeded(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        return gen

    def generate(
        self,
        prompt: str = "",
        length: int = 200,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int | None = 0,
        mode: str = "stateful",
        unknown: str = "error",
        on_chars: Callable[[list[str]], None] | None = None,
    ) -> list[str]:
        """``num_samples`` continuations of ``prompt`` (the prompt itself not included), as one batch.

        Each is ``length`` chars; with an empty prompt its first char is a random vocabulary char. Same seed and
        settings, same text; ``seed=None`` draws a fresh one. ``on_chars`` gets each step's chars, one per sample.
        """
        check_options(length, temperature, top_k, top_p, num_samples, mode, unknown)
        prompt_ids = self._ids(self.clean_prompt(prompt, unknown))
        check_fits("num_samples", num_samples, self.sample_bytes(len(prompt_ids), length, mode), self.device, "sample")
        gen = self._seeded(seed)
        noise = _Noise(num_samples, len(self.vocab), gen, self.device) if temperature else None
        pick = _Sampler(temperature, top_k, top_p, len(self.vocab), noise)
        chars = self.vocab.chars
        on_ids = None
        if on_chars is not None:

            def on_ids(row: torch.Tensor) -> None:
                on_chars([chars[i] for i in row.tolist()])

        with self._generating():
            out = self._run(prompt_ids, length, num_samples, mode, pick, gen, on_ids)
        return ["".join(chars[i] for i in row) for row in out.t().tolist()]

    def distributions(self, prompt: str, continuation: str, mode: str = "stateful") -> torch.Tensor:
        """Next-char probabilities while feeding ``continuation`` after ``prompt``, computed as ``generate`` does
        in ``mode``: row i is the distribution after prompt + continuation[:i] (``len(continuation) + 1`` rows)."""
        check_options(len(continuation), 1.0, 0, 1.0, 1, mode, "error")
        prompt_ids = self._ids(self.clean_prompt(prompt))
        if len(prompt_ids) == 0:
            raise ConfigError("distributions need a non-empty prompt")
        forced = _Forced(self._ids(self.clean_prompt(continuation)).cpu())
        with self._generating():
            self._run(prompt_ids, len(continuation) + 1, 1, mode, forced, self._seeded(0))
        return torch.stack(forced.probs).cpu()


# Control chars (C0 and C1) but newline and tab: on a terminal they ring the bell, move the cursor or start an escape
# sequence, which a model trained on a binary file or on text holding them generates as readily as letters.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` as a terminal shows it faithfully: each control char but newline and tab written as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
