"""Text generation: prime the LSTM with a prompt, then one step per char carrying (h, c), or the tutorial's
re-feed of the last ``seq_len`` chars (``mode='window'``); greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch

from charlstm.data import encode_inputs
from charlstm.errors import ConfigError
from charlstm.model import CharLSTM
from charlstm.vocab import CharVocab

MODES = ("stateful", "window")


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


def next_ids(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One id per row: argmax when ``temperature == 0``, else a draw from softmax(filtered logits / T)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """Generates text from a trained CharLSTM."""

    def __init__(
        self, net: CharLSTM, vocab: CharVocab, encoding: str, seq_len: int, lowercase: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:  # fmt: skip
        self.net = net.to(device).eval()
        self.vocab, self.encoding, self.seq_len, self.lowercase = vocab, encoding, seq_len, lowercase
        self.device = torch.device(device)

    @classmethod
    def from_module(cls, module, device: str | torch.device | None = None) -> Generator:
        hp = module.hparams
        return cls(module.net, CharVocab(hp.vocab), hp.encoding, hp.seq_len, hp.lowercase,
                   device or module.device)  # fmt: skip

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        return encode_inputs(ids, self.encoding, len(self.vocab))

    @torch.inference_mode()
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
        """``num_samples`` continuations of ``prompt`` (prompt not included), generated as one batch."""
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not allowed; use 'stateful' or 'window'")
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()
        if self.lowercase:
            prompt = prompt.lower()
        ids = self.vocab.encode(prompt, unknown=unknown)
        if len(ids) == 0:
            ids = torch.randint(len(self.vocab), (1,), generator=gen, device=self.device).cpu()
        ids = ids.to(self.device).unsqueeze(0).expand(num_samples, -1)
        was_training = self.net.training
        self.net.eval()
        out = torch.empty(num_samples, length, dtype=torch.long, device=self.device)
        history = ids
        state = None
        logits, state = self.net(self._encode(ids[:, -self.seq_len :] if mode == "window" else ids), None, True)
        for t in range(length):
            nxt = next_ids(logits, temperature, top_k, top_p, gen)
            out[:, t] = nxt
            if on_chars is not None:
                on_chars([self.vocab.chars[i] for i in nxt.tolist()])
            if t == length - 1:
                break
            if mode == "stateful":
                logits, state = self.net(self._encode(nxt[:, None]), state, True)
            else:
                keep = history[:, history.shape[1] - self.seq_len + 1 :] if self.seq_len > 1 else history[:, :0]
                history = torch.cat([keep, nxt[:, None]], dim=1)
                logits, _ = self.net(self._encode(history), None, True)
        self.net.train(was_training)
        return [self.vocab.decode(row) for row in out.cpu()]
