"""evaluate(cfg) -> Score: a checkpoint's bits/char on its run's validation text or on any text; run() is the
Hydra face of ``python eval.py``."""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from charlstm.app.config import TRAIN_RULES, Rule, check, check_missing
from charlstm.app.generate import GENERATE_RULES, device_and_checkpoint, write_output
from charlstm.core import checkpoint
from charlstm.core.errors import ConfigError, CorpusError, TrainingInterrupted, exit_on_error
from charlstm.core.hardware import check_fits
from charlstm.core.net import encode_inputs, sequence_bytes
from charlstm.core.rules import INT_GE1
from charlstm.core.vocab import CharVocab
from charlstm.data.windows import WindowDataset

EVAL_RULES: dict[str, Rule] = {
    "unknown": GENERATE_RULES["unknown"],
    "device": GENERATE_RULES["device"],
    "batch_size": INT_GE1,
    "windows": ("choice", ("all", "run"), "all (every validation char) or run (the run's own subsample)"),
    **{k: v for k, v in TRAIN_RULES.items() if k.startswith("data.") and k != "data.encoding"},
}
LN2 = math.log(2.0)


@dataclass
class Score:
    """What eval prints and writes: the mean over ``chars`` predicted chars, each from ``context`` chars before."""

    bits_per_char: float
    nats_per_char: float
    perplexity: float
    chars: int
    skipped: int
    context: int
    checkpoint: str
    text: str
    init_from: str | None = None  # the checkpoint its training started from (init_from), if any

    def line(self) -> str:
        skipped = f"   {self.skipped} unknown char(s) skipped" if self.skipped else ""
        origin = f"   initialised from {self.init_from}" if self.init_from else ""
        return (
            f"bits/char {self.bits_per_char:.4f}   nats/char {self.nats_per_char:.4f}   "
            f"perplexity {self.perplexity:.3f}   chars scored {self.chars}{skipped}{origin}"
        )


Batch = tuple[torch.Tensor, torch.Tensor]


def dataset_batches(dataset: Any, batch_size: int) -> Iterator[Batch]:
    """Consecutive batches of a windows dataset (inputs ``(B, T)``, next-char targets ``(B,)``), in order."""
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        if hasattr(dataset, "__getitems__"):  # one gather per batch
            yield dataset.__getitems__(indices)
        else:
            xs, ys = zip(*(dataset[i] for i in indices), strict=True)
            yield torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def score_batches(
    net: torch.nn.Module, batches: Iterable[Batch], encoding: str, vocab_size: int, device: torch.device
) -> tuple[float, int]:
    """Summed cross-entropy (nats) of each target given its window, and the number of targets.

    The same sum the validation loop takes: fp32 logits per batch, accumulated in float64.
    """
    net = net.to(device=device, dtype=torch.float32).eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits, _ = net(encode_inputs(x, encoding, vocab_size), last_only=True)
        total += F.cross_entropy(logits.float(), y, reduction="sum").double()
        count += y.numel()
    return float(total), count


def own_validation(
    path: Path, hp: dict[str, Any], windows: str = "all", moved: str | None = None
) -> tuple[Any, int, str]:
    """The validation windows of the run the checkpoint comes from, rebuilt from its saved config.yaml.

    ``windows=all`` scores every validation char, even where the run's validation took an even subsample
    (``data.val_max_windows``); ``windows=run`` takes the same subsample, to reproduce the run's logged val/bpc.
    ``moved`` is where the run's corpus file is now (``data.path=`` alone), accepted when it holds the same bytes.
    """
    from charlstm.app.rundir import absolute, check_moved_corpus, load_run_config, run_folder_of
    from charlstm.training.datamodule import CharDataModule

    run = run_folder_of(path)
    if run is None:
        raise ConfigError(
            f"checkpoint {path} has no run folder (no config.yaml beside its checkpoints/ folder), so its "
            "validation text is unknown; pass data=file data.path=X to score a text"
        )
    try:
        saved = load_run_config(run, otherwise="pass data=file data.path=X to score a text")
        saved = OmegaConf.to_container(saved.data, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{run / 'config.yaml'} cannot be read ({type(err).__name__}); pass data=...") from None
    accepted = inspect.signature(CharDataModule).parameters
    settings = {k: v for k, v in saved.items() if k in accepted}
    if moved is not None and absolute(moved) != absolute(saved.get("path") or ""):
        check_moved_corpus(saved, moved, run)
        settings["path"] = str(absolute(moved))
    # The checkpoint's vocabulary and case, so ids mean what they meant in training.
    settings.update(vocab=list(hp["vocab"]), lowercase=hp.get("lowercase", True))
    if windows == "all":
        settings["val_max_windows"] = None
    if "extra_plays" in accepted:
        settings["extra_plays"] = None  # more training text only: the validation split is the main text's tail
    dm = CharDataModule(**settings)
    dm.load()
    return dm.val_dataset(), int(dm.val_context), f"validation text of {run}"


def read_text(data: DictConfig, hp: dict[str, Any], unknown: str) -> tuple[torch.Tensor, int, str]:
    """The configured text as the checkpoint's ids (lowercased if it was trained so), and how many chars
    the vocabulary lacked (dropped with ``unknown=skip``). The text is read through the same prepared cache as
    training (data/prepared/: read once, then memory-mapped), so a big file costs no more memory than its ids."""
    from charlstm.data.prepared import corpus_ids, encode_as

    source = data.get("source") or "play"
    ids, vocab = corpus_ids(source, data.get("play") or "macbeth", data.get("path"), data.get("sha256"),
                            data.get("data_dir") or "data", data.get("errors") or "strict",
                            hp.get("lowercase", True), data.get("max_chars"))  # fmt: skip
    ids, skipped = encode_as(ids, vocab, CharVocab.from_list(hp["vocab"]), unknown)
    named = data.get("path") if source == "file" else f"play {data.get('play')}"
    return ids, skipped, str(named)


def evaluate(cfg: DictConfig) -> Score:
    """Score the checkpoint ``ckpt`` as configured (see configs/eval.yaml); writes ``output`` as JSON if set."""
    check_missing(cfg)
    check(cfg, EVAL_RULES)
    device, path = device_and_checkpoint(cfg, say_last=True)
    ckpt = checkpoint.load(path)
    net = checkpoint.build_net(ckpt, path)
    hp = ckpt["hyper_parameters"]
    del ckpt

    skipped = 0
    if cfg.get("data") is None or "source" not in cfg.data:  # no data=...: the run's own text (data.path: moved)
        moved = cfg.data.get("path") if cfg.get("data") is not None else None
        dataset, context, where = own_validation(path, hp, cfg.windows, moved)
    else:
        ids, skipped, where = read_text(cfg.data, hp, cfg.unknown)
        context = int(cfg.data.get("val_context") or hp["seq_len"])
        if len(ids) < context + 1:
            raise CorpusError(
                f"{where} has {len(ids)} usable chars, too few to predict one from data.val_context={context} "
                "chars before it; pass a longer text or a smaller data.val_context"
            )
        dataset = WindowDataset(ids, context)  # every char after the first context
    batches = dataset_batches(dataset, cfg.batch_size)
    batch = min(int(cfg.batch_size), len(dataset))  # a batch never holds more windows than the text has
    per_window = sequence_bytes(net, context, 1, training=False) + context * 8  # and its int64 ids
    check_fits("batch_size", cfg.batch_size, per_window, device, "window", count=batch)
    total, count = score_batches(net, batches, hp["encoding"], len(hp["vocab"]), device)
    if count == 0:
        raise CorpusError(f"{where} has no char to score after its first {context}; pass a longer text")
    nats = total / count
    perplexity = math.exp(nats) if nats < 709 else math.inf  # exp overflows a float past e**709
    score = Score(nats / LN2, nats, perplexity, count, skipped, context, str(path), where, hp.get("init_from"))
    if cfg.get("output"):
        write_output(str(cfg.output), json.dumps(asdict(score), indent=2) + "\n")
    return score


@exit_on_error
def run(cfg: DictConfig) -> float:
    """What ``python eval.py`` does: print one line and return bits/char."""
    try:
        score = evaluate(cfg)
    except KeyboardInterrupt:
        raise TrainingInterrupted("evaluation stopped by Ctrl-C") from None
    print(score.line(), file=sys.stdout, flush=True)
    return score.bits_per_char
