"""Callbacks Lightning lacks: TextSample writes a generated sample to TensorBoard's Text tab and the console at
each validation, so a run shows the model learning to write; ConfigHParams, LearningRate and ScalarLayout make
TensorBoard's HParams, Scalars and Custom Scalars tabs read well."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from charlstm.core.errors import ConfigError, VocabError
from charlstm.core.sampling import Generator, check_options, printable


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
        for logger in _tensorboards(trainer):
            logger.experiment.add_text(self.tag, as_markdown(text), global_step=step)
        if self.console:
            pl_module.print(f"sample at epoch {trainer.current_epoch}, step {step}:\n{printable(text)}")


# -- TensorBoard dashboards --------------------------------------------------------------------------------------
def _tensorboards(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)] if trainer.is_global_zero else []


def _hparam_value(value: Any) -> str | int | float:
    """TensorBoard's HParams take numbers and strings: null, booleans and lists are written as their YAML/JSON text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return value
    if isinstance(value, list | tuple):
        return json.dumps(list(value), ensure_ascii=False, default=str)
    return str(value)


def flatten_config(cfg: DictConfig | dict[str, Any]) -> dict[str, str | int | float]:
    """``{"data.seq_len": 50, "model.units": 300, "trainer.max_steps": -1, "seed": 1234, ...}``: every leaf of the
    (resolved, where possible) config under its dotted key; Hydra's ``_target_``-style keys are left out."""
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException:  # an interpolation only a Hydra run can resolve: keep it as written
            cfg = OmegaConf.to_container(cfg, resolve=False)
    flat: dict[str, str | int | float] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if str(key).startswith("_") and str(key).endswith("_"):
                continue
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(value, f"{name}.")
            else:
                flat[name] = _hparam_value(value if value != {} else None)

    walk(cfg, "")
    return flat


def hydra_choices() -> dict[str, str]:
    """The config groups this Hydra run picked (``experiment``, ``debug``, ...); empty outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        choices = HydraConfig.get().runtime.choices
    except (ImportError, ValueError):
        return {}
    return {k: str(v) for k, v in choices.items() if v is not None and not k.startswith("hydra/")}


# The HParams columns users compare, shown first (with the keys the command line sets, e.g. a sweep's)
LEADING_HPARAMS = ("experiment", "model.units", "model.layers", "model.lr", "data.seq_len", "data.batch_size")


def lead_with(experiment: Any, keys: list[str]) -> None:
    """Put ``keys`` first in an HParams experiment summary, in that order, marked ``differs``.

    TensorBoard's hparams plugin lists an experiment's hparams sorted by (not ``differs``, name) and shows the first
    ones as the table's columns; without a mark the alphabetical order opens with ``callbacks.*``. The rest stays
    available, alphabetically after them."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    infos = [type(info).FromString(info.SerializeToString()) for info in data.experiment.hparam_infos]

    order = {key: i for i, key in reversed(list(enumerate(keys)))}
    infos.sort(key=lambda info: order.get(info.name, len(keys)))
    for info in infos:
        info.differs = info.name in order
    del data.experiment.hparam_infos[:]
    data.experiment.hparam_infos.extend(infos)
    value.metadata.plugin_data.content = data.SerializeToString()


class ConfigHParams(Callback):
    """The whole resolved run config, flattened, in TensorBoard's HParams tab, one entry per run, with the run's
    ``hp/val_bpc_best``, ``hp/val_bpc`` (the latest validation) and ``hp/train_seconds`` (the model's training time,
    validation excluded) as its metrics.

    The entry is written when training starts (so a running or interrupted run is listed too) and its metrics are
    scalars updated at every validation and at the end. Its first columns are :data:`LEADING_HPARAMS` and the keys
    the command line set (a sweep's swept keys). A run resumed in its own folder keeps the entry it started with
    (TensorBoard would show the first one anyway) and its training time carries over (in the checkpoint).
    ``train()`` hands over the config (``config``) and the command line's keys (``command_keys``); without a config
    the model's hyperparameters are used, under ``model.``.
    """

    METRICS = ("hp/val_bpc_best", "hp/val_bpc", "hp/train_seconds")

    def __init__(self, config: DictConfig | dict[str, Any] | None = None) -> None:
        self.config = config
        self.command_keys: list[str] = []  # the keys the command line set (train() hands them over)
        self._training = False
        self._logged_at: int | None = None  # the step of the last metrics written

    def params(self, pl_module: pl.LightningModule) -> dict[str, str | int | float]:
        if self.config is not None:
            flat = flatten_config(self.config)
        else:
            hp = {k: v for k, v in pl_module.hparams.items() if k != "vocab"}
            flat = {f"model.{k}": _hparam_value(v) for k, v in hp.items()}
        for group in ("experiment", "debug", "hparams_search"):
            choice = hydra_choices().get(group)
            if choice is not None and group not in flat:
                flat[group] = choice
        if "vocab" in pl_module.hparams:
            flat["vocab_size"] = len(pl_module.hparams["vocab"])
        return flat

    def leading(self) -> list[str]:
        """The hparams TensorBoard shows first: the command line's keys, then :data:`LEADING_HPARAMS`."""
        keys = self.command_keys
        return keys + [k for k in LEADING_HPARAMS if k not in keys]

    @staticmethod
    def resumes_in_place(logger: TensorBoardLogger) -> bool:
        """Whether the logger's folder holds event files of an earlier process: the run this one resumes. The
        logger's writer opened its one file there when it was made (before any callback runs), so another file is
        an earlier process's."""
        return len(list(Path(logger.experiment.get_logdir()).glob("events.out.tfevents.*"))) > 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True
        loggers = [lg for lg in _tensorboards(trainer) if not self.resumes_in_place(lg)]
        if not loggers:
            return
        from torch.utils.tensorboard.summary import hparams

        experiment, start, _ = hparams(self.params(pl_module), dict.fromkeys(self.METRICS, 0.0))
        lead_with(experiment, self.leading())
        for logger in loggers:
            # SummaryWriter's public file_writer: it writes a ready Summary (add_hparams would open another folder)
            writer = logger.experiment.file_writer
            writer.add_summary(experiment)
            writer.add_summary(start)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, with_val: bool) -> None:
        metrics = {"hp/train_seconds": pl_module.train_seconds()}
        found = trainer.callback_metrics
        if with_val:
            for name, key in (("hp/val_bpc", "val/bpc"), ("hp/val_bpc_best", "val/bpc_best")):
                if key in found:
                    metrics[name] = float(found[key])
        step = trainer.global_step  # where val/* are: the steps done
        if not with_val and step == self._logged_at:
            return  # the end right after a validation: its numbers are already there
        self._logged_at = step
        for logger in _tensorboards(trainer):
            logger.log_metrics(metrics, step=step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._training:
            self._log(trainer, pl_module, with_val=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, with_val=False)
        from torch.utils.tensorboard.summary import hparams

        _, _, end = hparams({}, {})
        for logger in _tensorboards(trainer):
            logger.experiment.file_writer.add_summary(end)
            logger.experiment.flush()


class NewLearningRate(Callback):
    """A resume with another ``model.lr``: the restored optimizer's rates (and its schedule's base rates) are scaled
    by ``new / old`` when training starts, after Lightning restored them from the checkpoint, so the run goes on
    where its schedule was, at the new peak rate."""

    def __init__(self, old: float, new: float) -> None:
        self.old, self.new = old, new

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scale = self.new / self.old
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * scale
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * scale
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):  # LambdaLR: each step sets base_lr x factor(step)
                scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]


class LearningRate(Callback):
    """One learning-rate curve per optimizer (``train/lr``; ``train/lr/opt<i>`` for several), where Lightning's
    LearningRateMonitor draws one identical curve per parameter group. Groups whose rates differ get a curve each
    (``/pg<j>``). Logged like any metric, every ``trainer.log_every_n_steps`` steps or once per epoch."""

    def __init__(self, logging_interval: str = "step", tag: str = "train/lr") -> None:
        if logging_interval not in ("step", "epoch"):
            raise ConfigError(
                f"callbacks.lr_monitor.logging_interval={logging_interval!r} is not allowed; use step or epoch"
            )
        self.logging_interval, self.tag = logging_interval, tag

    def rates(self, trainer: pl.Trainer) -> dict[str, float]:
        rates = {}
        many = len(trainer.optimizers) > 1
        for i, opt in enumerate(trainer.optimizers):
            name = f"{self.tag}/opt{i}" if many else self.tag
            lrs = [float(group["lr"]) for group in opt.param_groups]
            if len(set(lrs)) == 1:
                rates[name] = lrs[0]
            else:
                rates.update({f"{name}/pg{j}": lr for j, lr in enumerate(lrs)})
        return rates

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self.logging_interval == "step":
            for name, lr in self.rates(trainer).items():
                pl_module.log(name, lr, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logging_interval == "epoch":
            for name, lr in self.rates(trainer).items():
                pl_module.log(name, lr, on_step=False, on_epoch=True, batch_size=1)


class ScalarLayout(Callback):
    """A custom-scalars layout (TensorBoard's Custom Scalars tab): each chart draws every scalar matching its
    regular expressions on one set of axes, e.g. training and validation bits/char together."""

    def __init__(self, charts: dict[str, list[str]] | None = None, category: str = "charlstm") -> None:
        self.charts = {str(k): [str(p) for p in v] for k, v in (charts or {}).items()}
        self.category = category

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.charts:
            return
        layout = {self.category: {title: ["Multiline", patterns] for title, patterns in self.charts.items()}}
        for logger in _tensorboards(trainer):
            logger.experiment.add_custom_scalars(layout)
