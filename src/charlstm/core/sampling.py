"""Text generation from a trained CharLSTM: prime the LSTM with the prompt once, then one step per char carrying
(h, c) (``mode='stateful'``), or the tutorial's re-feed of the last ``seq_len`` chars from a zero state
(``mode='window'``). Greedy (``temperature=0``), temperature, top-k and top-p; several samples run as one batch."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
from collections.abc import Callable, Iterator

import torch

from charlstm.core import checkpoint
from charlstm.core.errors import ConfigError
from charlstm.core.hardware import check_fits
from charlstm.core.net import CharLSTM, encode_inputs, sequence_bytes
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


def check_options(
    length: int, temperature: float, top_k: int, top_p: float, num_samples: int, mode: str, unknown: str
) -> None:
    """The generation settings, checked before any work; a bad one is one line naming it and what is allowed."""
    bad = [
        (not isinstance(length, int) or length < 0, f"length={length!r}", "an integer >= 0"),
        (not temperature >= 0, f"temperature={temperature!r}", "a number >= 0 (0 is greedy argmax)"),
        (not isinstance(top_k, int) or top_k < 0, f"top_k={top_k!r}", "an integer >= 0 (0 keeps every char)"),
        (not 0 < top_p <= 1, f"top_p={top_p!r}", "a number with 0 < top_p <= 1 (1 keeps every char)"),
        (not isinstance(num_samples, int) or num_samples < 1, f"num_samples={num_samples!r}", "an integer >= 1"),
        (mode not in MODES, f"mode={mode!r}", "stateful or window"),
        (unknown not in UNKNOWN, f"unknown={unknown!r}", "error or skip"),
    ]
    for is_bad, what, allowed in bad:
        if is_bad:
            raise ConfigError(f"{what} is not allowed: it must be {allowed}")


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
    """Writes the next id of rows ``lo:hi``: argmax when greedy, else argmax(logits / T + Gumbel noise), which is
    an exact draw from softmax(logits / T) (the Gumbel-max trick). Two tensor ops per step, no allocation; when
    the shared noise is used up, ``sync`` refills it (through a barrier when several workers share it)."""

    def __init__(
        self, temperature: float, top_k: int, top_p: float, vocab_size: int, noise: _Noise | None,
        lo: int, hi: int, sync: Callable[[], object] | None = None,
    ) -> None:  # fmt: skip
        self.greedy = noise is None
        self.inv_t = 1.0 / temperature if temperature else 0.0
        self.top_k, self.top_p = top_k, top_p
        self.filtering = 0 < top_k < vocab_size or top_p < 1.0
        if noise is not None:
            self.rows = noise.buf[:, lo:hi].unbind(0)  # views made once, refilled in place
            self.sync = sync or noise.refill
            self.scores = torch.empty(hi - lo, vocab_size, device=noise.buf.device)

    def __call__(self, t: int, logits: torch.Tensor, out: torch.Tensor) -> None:
        if self.greedy:
            torch.argmax(logits, 1, out=out)
            return
        j = t % len(self.rows)
        if j == 0 and t:
            self.sync()
        if self.filtering:
            torch.add(filter_logits(logits * self.inv_t, self.top_k, self.top_p), self.rows[j], out=self.scores)
        else:
            torch.add(self.rows[j], logits, alpha=self.inv_t, out=self.scores)
        torch.argmax(self.scores, 1, out=out)


def _samplers(
    ranges: list[tuple[int, int]], batch: int, vocab_size: int, temperature: float, top_k: int, top_p: float,
    gen: torch.Generator, device: torch.device,
) -> tuple[_Sampler, list[_Sampler], threading.Barrier | None]:  # fmt: skip
    """A sampler for the whole batch (the first char) and one per row range, all drawing on one noise buffer,
    so the text depends on the seed and the batch, never on how the rows are split between workers."""
    noise = _Noise(batch, vocab_size, gen, device) if temperature else None
    barrier = threading.Barrier(len(ranges), action=noise.refill) if noise and len(ranges) > 1 else None
    sync = barrier.wait if barrier else None
    first = _Sampler(temperature, top_k, top_p, vocab_size, noise, 0, batch)
    return first, [_Sampler(temperature, top_k, top_p, vocab_size, noise, lo, hi, sync) for lo, hi in ranges], barrier


class _Forced:
    """Feeds a fixed continuation instead of sampling and records each step's next-char distribution."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.probs = ids, []

    def __call__(self, t: int, logits: torch.Tensor, out: torch.Tensor) -> None:
        self.probs.append(torch.softmax(logits[0].float(), -1))
        out.fill_(int(self.ids[t]) if t < len(self.ids) else 0)


class _Weights:
    """The network's weights laid out for single steps, made once per generation and shared by every worker.

    The first layer's input projection and both its biases become a (vocab, 4*units) table indexed by char id
    (exact for every encoding: a char's input is fixed); each later layer's input and recurrent weights are
    stacked so one matmul reads [h_below, h_own]. Gate rows are reordered (i, f, o, g) and the g rows doubled, so
    one sigmoid call serves all four gates: tanh(x) = 2*sigmoid(2x) - 1 (tanh is the slowest elementwise op on a
    CPU).
    """

    def __init__(self, net: CharLSTM, encoding: str, device: torch.device) -> None:
        lstm = net.lstm
        units, layers, vocab = lstm.hidden_size, lstm.num_layers, net.vocab_size
        self.units, self.layers, self.vocab = units, layers, vocab

        # PyTorch's gate order is (i, f, g, o); ours is (i, f, o, g), with g scaled by 2
        order = torch.cat([torch.arange(0, 2 * units), torch.arange(3 * units, 4 * units),
                           torch.arange(2 * units, 3 * units)]).to(device)  # fmt: skip
        scale = torch.ones(4 * units, 1, device=device)
        scale[3 * units :] = 2.0

        def weight(name: str, k: int) -> torch.Tensor:
            return getattr(lstm, f"{name}_l{k}").detach().to(device, torch.float32)

        def gate_rows(w: torch.Tensor) -> torch.Tensor:
            return (w[order] * scale if w.dim() == 2 else w[order] * scale[:, 0]).contiguous()

        inputs = encode_inputs(torch.arange(vocab, device=device), encoding, vocab)
        if net.embed is not None:
            inputs = net.embed(inputs)
        proj = weight("weight_ih", 0) @ inputs.reshape(vocab, -1).to(torch.float32).t()  # (4*units, vocab)
        table = proj + (weight("bias_ih", 0) + weight("bias_hh", 0))[:, None]
        self.table = gate_rows(table).t().contiguous()
        self.weights = [gate_rows(weight("weight_hh", 0)).t().contiguous()]
        self.biases: list[torch.Tensor | None] = [None]
        for k in range(1, layers):
            stacked = torch.cat([weight("weight_ih", k), weight("weight_hh", k)], dim=1)
            self.weights.append(gate_rows(stacked).t().contiguous())
            self.biases.append(gate_rows(weight("bias_ih", k) + weight("bias_hh", k)))
        self.head_w = net.head.weight.detach().to(device, torch.float32).t().contiguous()
        self.head_b = net.head.bias.detach().to(device, torch.float32)


class _Stepper:
    """One step of the whole stack for a batch of char ids, in buffers allocated once per generation."""

    def __init__(self, w: _Weights, batch: int) -> None:
        device, units, layers = w.table.device, w.units, w.layers
        self.w, self.layers = w, layers
        self.h = torch.zeros(batch, layers * units, device=device)
        self.c = torch.zeros(layers, batch, units, device=device)
        self.gates = torch.empty(batch, 4 * units, device=device)
        self.tmp = torch.empty(batch, units, device=device)
        self.logits = torch.empty(batch, w.vocab, device=device)
        # views made once: slicing costs a Python call per use
        g, u = self.gates, units
        self.i, self.f, self.o, self.g = g[:, :u], g[:, u : 2 * u], g[:, 2 * u : 3 * u], g[:, 3 * u :]
        self.h_own = [self.h[:, k * u : (k + 1) * u] for k in range(layers)]
        self.h_pair = [self.h[:, (k - 1) * u : (k + 1) * u] if k else None for k in range(layers)]
        self.c_own = list(self.c.unbind(0))

    def load_state(self, h: torch.Tensor, c: torch.Tensor) -> None:
        """Take nn.LSTM's (h, c), shaped (layers, B or 1, units), broadcasting one primed row to the batch."""
        for k in range(self.layers):
            self.h_own[k].copy_(h[k].expand_as(self.h_own[k]))
            self.c_own[k].copy_(c[k].expand_as(self.c_own[k]))

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one char id per row; returns the next-char logits (a buffer overwritten by the next step)."""
        w, g, i, s = self.w, self.gates, self.i, self.g
        torch.index_select(w.table, 0, ids, out=g)
        for k in range(self.layers):
            if k == 0:
                g.addmm_(self.h_own[0], w.weights[0])
            else:
                torch.addmm(w.biases[k], self.h_pair[k], w.weights[k], out=g)
            g.sigmoid_()
            # c = f*c + i*tanh(x_g), with tanh(x_g) = 2*s - 1 and s = sigmoid(2*x_g)
            c = self.c_own[k]
            c.mul_(self.f).addcmul_(i, s, value=2.0).sub_(i)
            torch.tanh(c, out=self.tmp)
            torch.mul(self.o, self.tmp, out=self.h_own[k])
        return torch.addmm(w.head_b, self.h_own[-1], w.head_w, out=self.logits)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _loop(stepper: _Stepper, pick: Callable, out: torch.Tensor, on_ids: Callable | None = None,
          stop: threading.Event | None = None) -> None:  # fmt: skip
    """Steps 1.. of the stateful mode: feed the previous char, pick the next; out is (length, rows)."""
    step = stepper.step
    for t in range(1, len(out)):
        pick(t, step(out[t - 1]), out[t])
        if on_ids is not None:
            on_ids(out[t])
        if stop is not None and stop.is_set():
            return


def _in_threads(jobs: list[tuple[_Stepper, Callable, torch.Tensor]], barrier: threading.Barrier | None) -> None:
    """Run each (stepper, pick, rows) loop in its own thread, one torch thread each.

    Coarse parallelism beats torch's intra-op threads here: a step is ~17 small ops, each parallel region waits
    for the slowest thread (often one descheduled by another process), and one step of the whole batch leaves
    a second thread little to share (benchmarks/generate_speed.py).
    """
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(stepper: _Stepper, pick: Callable, out: torch.Tensor) -> None:
        torch.set_num_threads(1)  # per thread: OpenMP's thread count is thread-local
        try:
            with torch.inference_mode():
                _loop(stepper, pick, out, None, stop)
        except threading.BrokenBarrierError:
            pass
        except BaseException as err:
            errors.append(err)
            stop.set()
            if barrier is not None:
                barrier.abort()

    threads = [threading.Thread(target=work, args=job, daemon=True) for job in jobs]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C while waiting: stop the workers before leaving
        stop.set()
        if barrier is not None:
            barrier.abort()
        for thread in threads:
            thread.join()
        raise
    if errors:
        raise errors[0]


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

    def _run(
        self, prompt_ids: torch.Tensor, length: int, batch: int, mode: str, make_picks: Callable,
        gen: torch.Generator, on_ids: Callable[[torch.Tensor], None] | None = None, workers: int = 1,
    ) -> torch.Tensor:  # fmt: skip
        """The generation loop; returns the ids (length, batch).

        ``make_picks(ranges)`` returns (pick for the whole batch, one pick per row range, barrier or None), where a
        pick ``(t, logits, out)`` writes step t's ids. With ``workers`` > 1 (stateful only) the rows are split
        between that many threads, each stepping its own rows single-threaded.
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
        cuts = [batch * w // workers for w in range(workers + 1)] if stateful else [0, batch]
        ranges = list(itertools.pairwise(cuts))
        first, picks, barrier = make_picks(ranges)
        if n:
            # every sample shares the prompt: prime once with batch 1, then broadcast
            logits, state = self._prime(prompt_ids if stateful else prompt_ids[-self.seq_len :])
            first(0, logits.expand(batch, -1), out[0])
        if on_ids is not None:
            on_ids(out[0])
        if not stateful:
            for t in range(1, length):
                picks[0](t, self._window(buf[: n + t]), out[t])
                if on_ids is not None:
                    on_ids(out[t])
            return out
        weights = _Weights(self.net, self.encoding, self.device)
        steppers = [_Stepper(weights, hi - lo) for lo, hi in ranges]
        if n:
            for stepper in steppers:
                stepper.load_state(*state)
        if len(ranges) == 1:
            _loop(steppers[0], picks[0], out, on_ids)
        else:
            rows = [out[:, lo:hi] for lo, hi in ranges]
            _in_threads(list(zip(steppers, picks, rows, strict=True)), barrier)
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
        On a CPU, a stateful batch is split between ``torch.get_num_threads()`` worker threads.
        """
        check_options(length, temperature, top_k, top_p, num_samples, mode, unknown)
        prompt_ids = self._ids(self.clean_prompt(prompt, unknown))
        check_fits("num_samples", num_samples, self.sample_bytes(len(prompt_ids), length, mode), self.device, "sample")
        gen = self._seeded(seed)
        vocab_size, device = len(self.vocab), self.device

        def make_picks(ranges: list[tuple[int, int]]):
            return _samplers(ranges, num_samples, vocab_size, temperature, top_k, top_p, gen, device)

        workers = 1
        if mode == "stateful" and device.type == "cpu" and on_chars is None:
            workers = max(1, min(torch.get_num_threads(), num_samples))
        # with workers, every op runs single-threaded: the workers' steps and the batch-1 priming before them
        threads = _torch_threads(1) if workers > 1 else contextlib.nullcontext()
        chars = self.vocab.chars
        on_ids = None
        if on_chars is not None:

            def on_ids(row: torch.Tensor) -> None:
                on_chars([chars[i] for i in row.tolist()])

        was_training = self.net.training
        self.net.eval()
        try:
            with torch.inference_mode(), threads:
                out = self._run(prompt_ids, length, num_samples, mode, make_picks, gen, on_ids, workers)
        finally:
            self.net.train(was_training)
        return ["".join(chars[i] for i in row) for row in out.t().tolist()]

    def distributions(self, prompt: str, continuation: str, mode: str = "stateful") -> torch.Tensor:
        """Next-char probabilities while feeding ``continuation`` after ``prompt``, computed as ``generate`` does
        in ``mode``: row i is the distribution after prompt + continuation[:i] (``len(continuation) + 1`` rows)."""
        check_options(len(continuation), 1.0, 0, 1.0, 1, mode, "error")
        prompt_ids = self._ids(self.clean_prompt(prompt))
        if len(prompt_ids) == 0:
            raise ConfigError("distributions need a non-empty prompt")
        forced = _Forced(self._ids(self.clean_prompt(continuation)).cpu())
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.inference_mode():
                make_picks = lambda ranges: (forced, [forced], None)  # noqa: E731
                self._run(prompt_ids, len(continuation) + 1, 1, mode, make_picks, self._seeded(0))
        finally:
            self.net.train(was_training)
        return torch.stack(forced.probs).cpu()


# Control chars (C0 and C1) but newline and tab: on a terminal they ring the bell, move the cursor or start an escape
# sequence, which a model trained on a binary file or on text holding them generates as readily as letters.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` as a terminal shows it faithfully: each control char but newline and tab written as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
