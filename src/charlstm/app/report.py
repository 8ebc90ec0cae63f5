"""What a run tells: its start line, the lines at its end (run folder, bits/char, a sample) and its result.json."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from charlstm.app.build import TrainingRun
from charlstm.app.hydrajob import hydra_overrides, sweep_job
from charlstm.app.reliability import LastCheckpoint
from charlstm.app.rundir import override_key, swept_overrides
from charlstm.core.errors import CharLSTMError, CheckpointError, ConfigError, TrainingInterrupted
from charlstm.training.callbacks import sample_prompt
from charlstm.training.progress import ValidationLog

# The log lines of a run come from the training command's logger, wherever they are written.
log = logging.getLogger("charlstm.app.train")

AXES = ("step", "epoch")  # logged by the model for TensorBoard's x-axes, not results


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The run's numbers as floats: Lightning's callback metrics but the x-axes the model gives TensorBoard."""
    found = trainer.callback_metrics
    return {k: float(v) for k, v in found.items() if torch.is_tensor(v) and v.numel() == 1 and k not in AXES}


def describe(cfg: DictConfig, out: Path, recipe: str | None = None) -> str:
    """One line saying what this run trains, on what, for how long, and where its files go; ``recipe`` is the
    resumed run's own (its first command chose it), else this command's."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    d, m, t = cfg.data, cfg.model, cfg.trainer
    corpus = f"file {d.path}" if d.source == "file" else f"play {d.play}"
    limits = ", ".join(
        f"{k} {t.get(k)}" for k in ("max_steps", "max_epochs", "max_time") if t.get(k) not in (None, -1)
    )  # fmt: skip
    recipe = recipe or choices.get("experiment") or "none"
    return (
        f"training: recipe {recipe}, {corpus} ({d.layout}, seq_len {d.seq_len}, batch {d.batch_size}), "
        f"{m.layers} x {m.units} LSTM ({m.encoding}), {t.accelerator} {t.precision}, {limits or 'no limit'}; "
        f"run folder {out}"
    )


def say(line: str) -> None:
    """A line for the user: on the console and in train.log (printed when logging is not set up, e.g. in tests)."""
    if logging.getLogger().handlers:
        log.info(line)
    else:
        print(line, flush=True)


def report(cfg: DictConfig, metrics: dict[str, float], run: TrainingRun) -> None:
    """Say where the run's files are, its validation bits/char and a short sample."""
    from charlstm.core.sampling import Generator, printable

    trainer, out = run.trainer, run.output_dir
    lines = [f"run folder:   {out}"]
    best = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
    last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    folder = (best and best.dirpath) or (last and last.dirpath)
    if folder:
        names = [n for n in ("last.ckpt" if last else "", best and Path(best.best_model_path).name) if n]
        lines.append(f"checkpoints:  {folder}  ({', '.join(names)})")
    if any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
        job = sweep_job()
        logdir = job[2] if job is not None and out.parent == job[2] else out  # a sweep: all its jobs side by side
        lines.append(f"tensorboard:  tensorboard --logdir {logdir}")
    if "val/bpc" in metrics:
        lines.append(
            f"val/bpc:      {metrics['val/bpc']:.4f} (final)   {metrics.get('val/bpc_best', float('nan')):.4f} (best)"
            f"   val/loss {metrics.get('val/loss', float('nan')):.4f} nats/char   step {trainer.global_step}"
        )
    if "test/bpc" in metrics:
        lines.append(f"test/bpc:     {metrics['test/bpc']:.4f} (held-out text, best checkpoint)   "
                     f"test/loss {metrics['test/loss']:.4f} nats/char")  # fmt: skip
    say("\n".join(lines))
    if cfg.sample.length > 0:
        gen = Generator.from_module(run.model)
        prompt = gen.clean_prompt(cfg.sample.prompt or sample_prompt(run.datamodule))
        text = gen.generate(prompt, cfg.sample.length, cfg.sample.temperature, seed=cfg.seed or 0)[0]
        say(f"sample (temperature {cfg.sample.temperature}):\n{printable(prompt.lstrip(chr(10)) + text)}")


def run_result(
    cfg: DictConfig,
    state: str,
    seconds: float,
    run: TrainingRun | None = None,
    metrics: dict[str, float] | None = None,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """What ``result.json`` holds for this run: its swept settings, outcome, numbers and validation curve."""
    job = sweep_job()
    overrides = swept_overrides(hydra_overrides() or [])
    ran = run.cfg if run is not None else cfg  # the settings as the run resolved them (trainer.precision=auto ...)
    params = {}
    for override in overrides:
        key = override_key(override)
        value = OmegaConf.select(ran, key, default=None, throw_on_resolution_failure=False)
        params[key] = value if isinstance(value, int | float | str | bool) else override.split("=", 1)[-1]
    result: dict[str, Any] = {"job": job[0] if job else None, "state": state, "overrides": overrides,
                              "params": params, "metrics": metrics or {}}  # fmt: skip
    if run is not None:
        if metrics is None:  # a stopped run: what it had reached
            result["metrics"] = scalar_metrics(run.trainer)
        history = next((cb.history for cb in run.callbacks if isinstance(cb, ValidationLog)), [])
        result.update(steps=run.trainer.global_step, train_seconds=run.model.train_seconds(),
                      run_dir=str(run.output_dir), history=[list(p) for p in history])  # fmt: skip
    else:
        result["train_seconds"] = seconds
    if error is not None:
        line = str(error) if isinstance(error, CharLSTMError) else f"{type(error).__name__}: {error}"
        result["error"] = " ".join(line.split())
        result["error_type"] = type(error.__cause__ or error).__name__
    return result


def record_failure(cfg: DictConfig, exc: BaseException, folder: Path, seconds: float) -> None:
    """A failed sweep job: result.json with its one-line error, the line on the console and in train.log."""
    from charlstm.app.summary import FAILED, INTERRUPTED, PRUNED, write_result

    interrupted = isinstance(exc, TrainingInterrupted | KeyboardInterrupt)
    pruned = "TrialPruned" in (type(exc).__name__, type(exc.__cause__).__name__)
    state = INTERRUPTED if interrupted else PRUNED if pruned else FAILED
    result = run_result(cfg, state, seconds, getattr(exc, "training_run", None), error=exc)
    write_result(folder, result)
    if not interrupted:
        if not isinstance(exc, CharLSTMError):
            log.error("sweep job failed", exc_info=exc, extra={"file_only": True})
        job = f"job {result['job']} ({' '.join(result['overrides']) or 'no overrides'})"
        if logging.getLogger().handlers:
            logging.getLogger("charlstm").error("%s: %s", job, result["error"], extra={"file_only": True})
        print(f"{'pruned' if pruned else 'error'}: {job}: {result['error']}", file=sys.stderr, flush=True)


def record_stopped(cfg: DictConfig, exc: BaseException, folder: Path, resuming: bool, seconds: float) -> None:
    """A single run that stopped: result.json with its one-line error and what it had reached. A resume refused
    before it trained (another process holds the run, a changed setting) leaves the run's result.json as it was;
    one that stopped while training keeps the run's history in it."""
    from charlstm.app.rundir import holds
    from charlstm.app.summary import FAILED, INTERRUPTED, read_result, write_result

    refused = isinstance(exc, ConfigError | CheckpointError) or not holds(folder)
    if not folder.is_dir() or (resuming and refused):
        return
    state = INTERRUPTED if isinstance(exc, TrainingInterrupted) else FAILED
    run = getattr(exc, "training_run", None)  # what the run reached, when it stopped while training
    result = run_result(cfg, state, seconds, run, error=exc)
    earlier = read_result(folder) if resuming and run is None else None
    if earlier:
        result = {**earlier, **{k: result[k] for k in ("state", "error", "error_type")}}
    write_result(folder, result)


def record_finished(
    cfg: DictConfig, run: TrainingRun, metrics: dict[str, float], folder: Path, in_sweep: bool, seconds: float
) -> None:
    """A run that ended: result.json beside its checkpoints (a resumed run's in the run's own folder), a sweep job's
    in the job folder. A trial the Optuna pruner stopped ends like any run, recorded as pruned."""
    from charlstm.app.pruning import pruned_at
    from charlstm.app.summary import COMPLETE, PRUNED, write_result

    step = pruned_at(run.callbacks)
    result = run_result(cfg, COMPLETE if step is None else PRUNED, seconds, run, metrics)
    where = folder if in_sweep else run.output_dir
    write_result(where, result if step is None else {**result, "pruned_at_step": step})
