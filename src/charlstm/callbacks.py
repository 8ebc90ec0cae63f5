"""Callbacks Lightning lacks: TextSample writes a generated sample to TensorBoard's Text tab and the console at
each validation, so a run shows the model learning to write."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from charlstm.errors import ConfigError, VocabError
from charlstm.sampling import Generator, check_options


def check_prompt(gen: Generator, prompt: str, key: str) -> str:
    """The prompt as the model reads it; chars the vocabulary lacks fail in one line naming the config key."""
    try:
        return gen.clean_prompt(prompt)
    except VocabError as err:
        what = str(err).split("; remove")[0].replace("the prompt", f"{key}={prompt!r}", 1)
        raise VocabError(f"{what}; remove them from {key}") from None


def sample_prompt(datamodule: Any, limit: int = 30) -> str:
    """A natural start for a sample: the first whole line of the validation text (cut at a word), else a line
    start."""
    vocab = datamodule.vocab
    head = vocab.decode(datamodule.val_ids[:2000].long().tolist()) if datamodule.val_ids is not None else ""
    lines = head.split("\n")[1:-1] if "\n" in head else []
    for line in lines:
        line = line.strip()
        if len(line) >= 3:
            return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] or line[:limit]
    return "\n" if "\n" in vocab.chars else ""


def as_markdown(text: str) -> str:
    """TensorBoard renders text as Markdown: indented lines show as generated (newlines, spaces, any symbols)."""
    return "\n".join("    " + line for line in text.split("\n"))


class TextSample(Callback):
    """After every ``every_n_epochs``-th validation (never the sanity check), generate one sample from the live
    model with its own seeded generator (training's random state is untouched) on rank 0 only."""

    def __init__(
        self,
        prompt: str = "",
        length: int = 200,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        every_n_epochs: int = 1,
        seed: int = 0,
        mode: str = "stateful",
        console: bool = True,
        tag: str = "samples/text",
    ) -> None:
        try:
            check_options(length, temperature, top_k, top_p, 1, mode, "error")
            if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
                raise ConfigError(f"every_n_epochs={every_n_epochs!r} is not allowed: it must be an integer >= 1")
        except ConfigError as err:
            raise ConfigError(f"callbacks.text_sample.{err}") from None
        self.prompt, self.length, self.temperature = str(prompt), length, temperature
        self.top_k, self.top_p, self.every_n_epochs, self.seed, self.mode = top_k, top_p, every_n_epochs, seed, mode
        self.console, self.tag = console, tag
        self.texts: list[tuple[int, str]] = []  # (global step, sample) of this run, newest last
        self._start = ""  # with no prompt: the first line of the validation text (set when training starts)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a prompt the vocabulary cannot read fails now, not after the first epoch
        check_prompt(Generator.from_module(pl_module), self.prompt, "callbacks.text_sample.prompt")
        datamodule = getattr(trainer, "datamodule", None)
        if not self.prompt and getattr(datamodule, "val_ids", None) is not None:
            self._start = sample_prompt(datamodule)

    def sample(self, pl_module: pl.LightningModule) -> str:
        gen = Generator.from_module(pl_module)
        prompt = gen.clean_prompt(self.prompt or self._start)
        text = gen.generate(prompt, self.length, self.temperature, self.top_k, self.top_p, seed=self.seed,
                            mode=self.mode)[0]  # fmt: skip
        return prompt + text

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.length == 0 or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        text = self.sample(pl_module)
        step = trainer.global_step
        self.texts.append((step, text))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(self.tag, as_markdown(text), global_step=step)
        if self.console:
            pl_module.print(f"sample at epoch {trainer.current_epoch}, step {step}:\n{text}")
