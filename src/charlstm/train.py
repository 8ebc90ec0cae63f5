"""train(cfg) -> (metrics, objects): the whole training run as one plain function; main() is the Hydra face."""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Checkpoint, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from charlstm import checkpoint
from charlstm.callbacks import ConfigHParams
from charlstm.config import validate_train
from charlstm.errors import (
    CharLSTMError,
    CheckpointError,
    ConfigError,
    TrainingInterrupted,
    exit_on_error,
    process_rank,
)
from charlstm.reliability import AtomicCheckpointIO, LastCheckpoint, ensure_last_checkpoint

log = logging.getLogger(__name__)


def check_accelerator(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible to torch "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda or 'no'}); "
            "run on the CPU with trainer=cpu (or trainer.accelerator=cpu)"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps but MPS is not available; use trainer.accelerator=cpu")


def instantiate_named(group: DictConfig | None) -> list[Any]:
    """Instantiate each ``_target_`` entry of a named dict (callbacks, loggers); null entries are skipped."""
    if not group:
        return []
    built = []
    for node in group.values():
        if isinstance(node, DictConfig) and "_target_" in node:
            try:
                built.append(instantiate(node))
            except InstantiationException as err:
                # Hydra wraps what the constructor raised; our own errors keep their one line.
                if isinstance(err.__cause__, CharLSTMError):
                    raise err.__cause__ from None
                raise
    return built


RUN_FILES = ("config.yaml",)
# Set by rank 0 when it resolves `ckpt_path=last`, so DDP ranks started later resume the very same file.
RESUME_ENV = "CHARLSTM_RESUME_PATH"


def check_resume_compatible(ckpt_path: Path, ckpt: dict[str, Any], model: pl.LightningModule) -> None:
    """A resumed run must have the checkpoint's vocabulary, model shape, optimizer and schedule."""
    hp = ckpt["hyper_parameters"]
    mine = model.hparams
    if list(hp["vocab"]) != list(mine.vocab):
        theirs, ours = set(hp["vocab"]), set(mine.vocab)
        diff = sorted(ours ^ theirs)
        shown = ", ".join(repr(c) for c in diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        detail = f"differing chars: {shown}" if diff else "same chars in another order"
        raise CheckpointError(
            f"checkpoint {ckpt_path} was trained on another vocabulary ({len(hp['vocab'])} chars, this corpus "
            f"has {len(mine.vocab)}; {detail}); resume with the same data settings or start a new run "
            "without ckpt_path"
        )
    keys = ["encoding", "units", "layers", "optimizer", "scheduler"]
    if mine.get("encoding") == "embedding":
        keys.append("embed_dim")
    for key in keys:
        if key in hp and hp.get(key) != mine.get(key):
            raise CheckpointError(
                f"checkpoint {ckpt_path} has model.{key}={hp.get(key)} but this run has model.{key}={mine.get(key)}; "
                f"resume with model.{key}={hp.get(key)} or start a new run without ckpt_path"
            )


def epochs_done(ckpt: dict[str, Any]) -> int:
    """Whole epochs a checkpoint has trained (an epoch saved at its end counts as done)."""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(ckpt.get("epoch", 0))


def resolve_resume(cfg: DictConfig) -> Path:
    """The checkpoint ``ckpt_path`` names; ``last`` is the newest run's last.ckpt, the same one on every rank."""
    value = str(cfg.ckpt_path)
    if value == "last" and process_rank() > 0 and os.environ.get(RESUME_ENV):
        return Path(os.environ[RESUME_ENV])
    path = checkpoint.resolve(value, cfg.paths.outputs_root).resolve()
    if value == "last" and process_rank() == 0:
        os.environ[RESUME_ENV] = str(path)
    return path


def run_folder_of(ckpt_path: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``RUN/checkpoints/x.ckpt`` beside ``RUN/config.yaml``), if any."""
    run = ckpt_path.parent.parent
    if ckpt_path.parent.name == "checkpoints" and all((run / f).is_file() for f in RUN_FILES):
        return run
    return None


def check_resume_has_work(cfg: DictConfig, ckpt_path: Path, ckpt: dict[str, Any]) -> None:
    done, max_epochs = epochs_done(ckpt), cfg.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs != -1 and done >= max_epochs:
        raise ConfigError(
            f"checkpoint {ckpt_path} has already trained {done} epoch(s) and trainer.max_epochs={max_epochs}; "
            f"raise it to continue, e.g. trainer.max_epochs={done + max(1, max_epochs)}"
        )
    max_steps = cfg.trainer.get("max_steps")
    if max_steps is not None and max_steps != -1 and ckpt["global_step"] >= max_steps:
        raise ConfigError(
            f"checkpoint {ckpt_path} is at step {ckpt['global_step']} and trainer.max_steps={max_steps}; "
            "raise it to continue"
        )


def instantiate_loggers(group: DictConfig | None, purge_step: int | None) -> list[Any]:
    """The configured loggers; a resumed TensorBoard log hides the steps the interrupted run logged after
    its checkpoint (``purge_step``), so the curves continue without a zig-zag."""
    loggers = []
    for node in (group or {}).values():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        if purge_step is not None and str(node._target_).endswith("TensorBoardLogger"):
            loggers.append(instantiate(node, purge_step=purge_step))
        else:
            loggers.append(instantiate(node))
    return loggers


def save_run_config(cfg: DictConfig, out: Path, resumed: Path | None, step: int) -> None:
    """config.yaml for a new run; config-resume-N.yaml beside it for each resume (the first is never lost)."""
    out.mkdir(parents=True, exist_ok=True)
    name = "config.yaml"
    if resumed is not None and (out / name).exists():
        n = 1
        while (out / f"config-resume-{n}.yaml").exists():
            n += 1
        name = f"config-resume-{n}.yaml"
    OmegaConf.save(cfg, out / name, resolve=True)
    if resumed is None:
        return
    log.info("resuming %s at step %d in %s", resumed, step, out)
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    except ValueError:
        hydra_dir = None
    if hydra_dir is not None and hydra_dir.resolve() != out.resolve():
        # Hydra made a fresh folder for this command; point from it to where the run goes on.
        hydra_dir.mkdir(parents=True, exist_ok=True)
        (hydra_dir / "resumed.txt").write_text(
            f"this command resumed {resumed} (step {step}); its checkpoints and TensorBoard events are in {out}\n"
        )


def interrupted_error(exc: BaseException, trainer: pl.Trainer, last: LastCheckpoint) -> TrainingInterrupted:
    """The line for a stop that happened outside the save-and-stop path (before training, or a 2nd Ctrl-C)."""
    signum = signal.SIGTERM if isinstance(exc, SIGTERMException) else signal.SIGINT
    if last.last_saved_step is not None:
        saved = f"the newest checkpoint is {last.path} (step {last.last_saved_step})"
    else:
        saved = "no checkpoint was written by this run"
    return TrainingInterrupted(
        f"{signal.Signals(signum).name} at step {trainer.global_step}: stopped without saving; {saved}", signum
    )


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> pl.Trainer:
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train a model as configured; returns the final metrics and the objects built (for tests and callers)."""
    OmegaConf.set_struct(cfg, True)
    validate_train(cfg)
    check_accelerator(str(cfg.trainer.accelerator))
    ckpt_path, ckpt = None, None
    if cfg.get("ckpt_path"):
        ckpt_path = resolve_resume(cfg)
        ckpt = checkpoint.load(ckpt_path)
        check_resume_has_work(cfg, ckpt_path, ckpt)
        run_dir = run_folder_of(ckpt_path)
        if run_dir is not None:
            # Continue in the checkpoint's run folder: checkpoints and TensorBoard curves carry on in place.
            with open_dict(cfg):
                cfg.paths.output_dir = str(run_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data, _convert_="all")
    vocab = datamodule.load()
    model = instantiate(
        cfg.model, _convert_="all", vocab=vocab.to_list(), seq_len=cfg.data.seq_len, layout=cfg.data.layout,
        lowercase=cfg.data.lowercase,
    )  # fmt: skip
    if ckpt is not None:
        check_resume_compatible(ckpt_path, ckpt, model)
    out = Path(cfg.paths.output_dir)
    callbacks = instantiate_named(cfg.get("callbacks"))
    for cb in callbacks:
        if isinstance(cb, ConfigHParams):
            cb.config = cfg  # the whole run config goes into TensorBoard's HParams tab
    if cfg.trainer.get("enable_checkpointing", True):
        last = ensure_last_checkpoint(callbacks, out / "checkpoints")
    else:
        callbacks = [cb for cb in callbacks if not isinstance(cb, Checkpoint)]
        last = LastCheckpoint(out / "checkpoints")  # never attached: only reports that nothing was saved
    step = int(ckpt["global_step"]) if ckpt is not None else 0
    loggers = instantiate_loggers(cfg.get("logger"), purge_step=step if ckpt is not None else None)
    if not loggers:  # logger=none: nothing to monitor the learning rate into (Lightning would refuse to start)
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    trainer = build_trainer(cfg, callbacks, loggers)

    if trainer.is_global_zero:
        save_run_config(cfg, out, ckpt_path, step)
    del ckpt
    try:
        with warnings.catch_warnings():
            # A resumed run writes into its own checkpoint folder on purpose.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True
            )
    except (KeyboardInterrupt, SystemExit) as exc:
        raise interrupted_error(exc, trainer, last) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer,
               "callbacks": callbacks, "loggers": loggers, "output_dir": out}  # fmt: skip
    return metrics, objects


def report(cfg: DictConfig, metrics: dict[str, float], objects: dict[str, Any]) -> None:
    """Print where the run's files are, its validation bits/char and a short sample."""
    from charlstm.sampling import Generator

    trainer: pl.Trainer = objects["trainer"]
    out: Path = objects["output_dir"]
    lines = [f"run folder:   {out}"]
    best = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
    last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    folder = (best and best.dirpath) or (last and last.dirpath)
    if folder:
        names = [n for n in ("last.ckpt" if last else "", best and Path(best.best_model_path).name) if n]
        lines.append(f"checkpoints:  {folder}  ({', '.join(names)})")
    if trainer.loggers:
        lines.append(f"tensorboard:  tensorboard --logdir {out.parent if out.name.isdigit() else out}")
    if "val/bpc" in metrics:
        lines.append(
            f"val/bpc:      {metrics['val/bpc']:.4f} (final)   {metrics.get('val/bpc_best', float('nan')):.4f} (best)"
            f"   val/loss {metrics.get('val/loss', float('nan')):.4f} nats/char"
        )
    print("\n".join(lines))
    if cfg.sample.length > 0:
        gen = Generator.from_module(objects["model"])
        text = gen.generate(cfg.sample.prompt, cfg.sample.length, cfg.sample.temperature, seed=cfg.seed or 0)[0]
        print(f"sample (temperature {cfg.sample.temperature}):\n{cfg.sample.prompt}{text}")


@exit_on_error
def run(cfg: DictConfig) -> float | None:
    """What ``python train.py`` does: train, report, return the optimized metric for sweepers."""
    try:
        metrics, objects = train(cfg)
    except KeyboardInterrupt:
        raise TrainingInterrupted("SIGINT before training started; nothing to save", signal.SIGINT) from None
    except MisconfigurationException as err:
        # Lightning's own checks of trainer settings: a config mistake like any other.
        raise ConfigError(f"{' '.join(str(err).split())} (a trainer setting, see configs/trainer/)") from None
    if objects["trainer"].is_global_zero:
        report(cfg, metrics, objects)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return value
