"""train(cfg) -> (metrics, objects): the whole training run as one plain function; main() is the Hydra face."""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Checkpoint, LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from charlstm.app import cluster
from charlstm.app.cli import command_line
from charlstm.app.config import check_top_level, validate_train
from charlstm.app.jobranks import sweep_job_ranks
from charlstm.app.logs import quiet_known_warnings, route_library_logs
from charlstm.app.reliability import AtomicCheckpointIO, LastCheckpoint, ensure_last_checkpoint
from charlstm.app.rundir import (
    absolute,
    check_moved_corpus,
    command_line_keys,
    hold,
    holds,
    holds_a_run,
    let_go,
    load_run_config,
    override_key,
    run_folder_of,
)
from charlstm.app.search import search_needs_multirun
from charlstm.core import checkpoint, finetune
from charlstm.core.errors import (
    CharLSTMError,
    CheckpointError,
    ConfigError,
    DivergenceError,
    TrainingFailed,
    TrainingInterrupted,
    exit_on_error,
    process_rank,
)
from charlstm.core.fileio import atomic_write_text
from charlstm.core.hardware import check_fits, resolve_precision
from charlstm.core.net import sequence_bytes
from charlstm.core.vocab import char_list
from charlstm.data.prepared import text_sha256
from charlstm.training.callbacks import ConfigHParams, NewLearningRate, check_prompt, sample_prompt
from charlstm.training.progress import FinalValidation, ModelLine, ValidationLog

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


AXES = ("step", "epoch")  # logged by the model for TensorBoard's x-axes, not results


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The run's numbers as floats: Lightning's callback metrics but the x-axes the model gives TensorBoard."""
    found = trainer.callback_metrics
    return {k: float(v) for k, v in found.items() if torch.is_tensor(v) and v.numel() == 1 and k not in AXES}


# Set by rank 0 when it resolves `ckpt_path=last`, so DDP ranks started later resume the very same file.
RESUME_ENV = "CHARLSTM_RESUME_PATH"


def check_resume_compatible(ckpt_path: Path, ckpt: dict[str, Any], model: pl.LightningModule) -> None:
    """A resumed run must have the checkpoint's vocabulary, model shape, optimizer and schedule."""
    hp = ckpt["hyper_parameters"]
    mine = model.hparams
    if list(hp["vocab"]) != list(mine.vocab):
        theirs, ours = set(hp["vocab"]), set(mine.vocab)
        diff = sorted(ours ^ theirs)
        detail = f"differing chars: {char_list(diff, 8)}" if diff else "same chars in another order"
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
    try:
        path = checkpoint.resolve(value, cfg.paths.outputs_root).resolve()
    except CheckpointError as err:
        # checkpoint.resolve speaks generate.py's key; train.py's is ckpt_path
        raise CheckpointError(str(err).replace("ckpt=", "ckpt_path=")) from None
    if value == "last" and process_rank() == 0:
        os.environ[RESUME_ENV] = str(path)
    return path


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
    """config.yaml for a new run; config-resume-N.yaml beside it for each resume (the first is never lost). Written
    atomically. A corpus file is recorded by its absolute path and its sha256 (``data.sha256``), so the run can be
    resumed or scored from any working folder, and from a new ``data.path`` once the file has moved."""
    out.mkdir(parents=True, exist_ok=True)
    name = "config.yaml"
    if resumed is not None and (out / name).exists():
        n = 1
        while (out / f"config-resume-{n}.yaml").exists():
            n += 1
        name = f"config-resume-{n}.yaml"
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    corpus = local_corpus(saved.data)
    if corpus is not None:
        saved.data.path = str(corpus)
        if saved.data.get("sha256") is None:  # the hash preparing the corpus took (prepared's index)
            d = saved.data
            saved.data.sha256 = text_sha256(corpus, d.data_dir, bool(d.lowercase), str(d.get("errors") or "strict"))
    atomic_write_text(out / name, OmegaConf.to_yaml(saved))
    if resumed is not None:
        log.info("resuming %s at step %d in %s", resumed, step, out)


def local_corpus(data: DictConfig) -> Path | None:
    """The absolute path of the run's corpus when it is a local file (``data=file``, not a URL), else None."""
    path = data.get("path")
    if data.get("source") != "file" or not path or re.match(r"^https?://", str(path)):
        return None
    return absolute(path)


def reached(err: CharLSTMError, objects: dict[str, Any]) -> CharLSTMError:
    """``err`` carrying the run's objects, so that the ``result.json`` of a run stopped by it keeps the steps,
    metrics and validation curve the run had reached."""
    err.objects = objects
    return err


def interrupted_error(exc: BaseException, trainer: pl.Trainer, last: LastCheckpoint) -> TrainingInterrupted:
    """The line for a stop that happened outside the save-and-stop path (before training, or a 2nd Ctrl-C)."""
    signum = signal.SIGTERM if isinstance(exc, SIGTERMException) else signal.SIGINT
    if last.last_saved_step is not None:
        saved = f"the newest checkpoint is {last.path} (step {last.last_saved_step}); resume with: " \
                f"{command_line('train.py', f'ckpt_path={last.path}')}"  # fmt: skip
    else:
        saved = "no checkpoint was written by this run"
    return TrainingInterrupted(
        f"{signal.Signals(signum).name} at step {trainer.global_step}: stopped without saving; {saved}", signum
    )


# What a resumed run may change on the command line: limits, hardware, logging and reporting, and the learning rate
# (a diverged run goes on with a smaller one). Any other setting under data.* or model.* (or another recipe) would
# continue the run on other text or another network: set to the run's own value it is accepted, else refused.
RESUME_SAFE = (
    "trainer.max_steps", "trainer.max_time", "trainer.max_epochs", "trainer.min_epochs", "trainer.log_every_n_steps",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch", "trainer.limit_val_batches", "trainer.num_sanity_val_steps",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.precision",
    "trainer.gradient_clip_val", "trainer.profiler", "trainer.deterministic",
    "callbacks", "logger", "sample", "paths", "ckpt_path", "seed", "optimized_metric", "task_name",
    "data.num_workers", "data.val_batch_size", "model.lr",
)  # fmt: skip
# trainer=NAME on a resume changes the hardware only
TRAINER_HARDWARE = ("accelerator", "devices", "num_nodes", "strategy", "precision")
# Config groups whose choice is the run's recipe, compared with the run's own choice on a resume
RESUME_GROUPS = ("data", "model", "experiment")


def hydra_overrides() -> list[str] | None:
    """The command line's overrides when running under Hydra (None when called directly, e.g. from tests)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def is_safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in RESUME_SAFE)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"data.seq_len": 50, ...}``: every value of a plain nested dict, by its dotted key."""
    if not isinstance(node, dict) or not node:
        return {prefix.rstrip("."): node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(leaves(value, f"{prefix}{key}."))
    return flat


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The config's values, resolved, except ``paths`` (a resume keeps the run's own folders)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    container.pop("paths", None)
    return container


def run_choices(run_dir: Path) -> dict[str, str]:
    """The config groups the run's own command chose (RUN/.hydra/hydra.yaml); empty when it has none."""
    try:
        choices = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices
        return {str(k): str(v) for k, v in choices.items() if v is not None}
    except Exception:  # no .hydra (a run trained from Python), or an unreadable one: nothing to compare
        return {}


def same_value(key: str, old: Any, new: Any) -> bool:
    if key == "data.path" and old and new:
        return absolute(old) == absolute(new)
    return old == new


def resumed_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> DictConfig:
    """The resumed run's own saved config, with the command line's safe overrides on top.

    A resume continues the run as it was configured (its data, recipe and model), so ``python train.py
    ckpt_path=RUN/checkpoints/last.ckpt`` needs nothing else. The command line may repeat the run's own settings
    (its whole first command with ``ckpt_path`` added): a setting equal to the run's value is accepted; one that
    would change its data, recipe or model is refused in one line naming the key with the run's value and the new
    one. ``data.path`` may name the run's corpus where it is now (same bytes); ``model.lr`` may change. A config
    group chosen on the command line (``data=shakespeare``, ``experiment=seed``) is compared with the run's own
    choice (RUN/.hydra/hydra.yaml).
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    saved = load_run_config(run_dir)
    where = run_dir / "config.yaml"

    def refuse(override: str, what: str) -> ConfigError:
        return ConfigError(
            f"{override} would change {what} ({where}); resume without it (the run keeps its own settings), or start "
            "a new run without ckpt_path"
        )

    old_choices = run_choices(run_dir)
    hydra_cfg = HydraConfig.get()
    choices = {str(k): str(v) for k, v in hydra_cfg.runtime.choices.items() if v is not None}
    mine = plain(cfg)
    now, old = leaves(mine), leaves(OmegaConf.to_container(saved, resolve=True))
    asked: dict[str, str] = {}  # setting -> the override that asks for it: every key an override names
    groups = [o for o in overrides if override_key(o) in choices or override_key(o) in RESUME_GROUPS]
    for override in reversed(overrides):  # the last override of a key is the one that counts
        if override not in groups:
            key = override_key(override)
            for name in now.keys() | old.keys():
                if name == key or name.startswith(key + "."):
                    asked.setdefault(name, override)
    before: dict[str, Any] | None = None
    for override in [o for i, o in enumerate(groups) if override_key(o) not in map(override_key, groups[i + 1 :])]:
        group = override_key(override)  # the last choice of each group
        if group == "trainer":  # the hardware only, below
            continue
        if is_safe(group):  # logger=csv, callbacks=none
            OmegaConf.update(saved, group, OmegaConf.select(cfg, group), merge=False, force_add=True)
            continue
        if group in RESUME_GROUPS and old_choices:  # the run's own choice is known: the choice is what counts
            if choices.get(group) != old_choices.get(group):
                raise refuse(override, f"the {group} of the run being resumed from {old_choices.get(group)} to "
                                       f"{choices.get(group)}")  # fmt: skip
            continue
        # any other group (debug=fast), or the run's choice unknown: the settings the choice gives another value than
        # the plain config has (a group of the global package, e.g. a recipe, may set any of them)
        if before is None:
            before = leaves(plain(compose(config_name=hydra_cfg.job.config_name, overrides=[])))
        for name in now.keys() | before.keys():
            if now.get(name) != before.get(name) and (group not in mine or name.startswith(group + ".")):
                asked.setdefault(name, override)
    for override in overrides:
        if override_key(override) == "trainer":
            for name in TRAINER_HARDWARE:
                if name in cfg.trainer:
                    OmegaConf.update(saved, f"trainer.{name}", cfg.trainer[name], force_add=True)
    for name, override in sorted(asked.items()):
        if override_key(override) == "trainer" or name.startswith("paths."):
            continue
        if is_safe(name):
            if not override.startswith("~"):
                OmegaConf.update(saved, name, OmegaConf.select(cfg, name), merge=False, force_add=True)
            continue
        new = now.get(name)
        if same_value(name, old.get(name), new):
            continue
        if name == "data.path" and new:
            check_moved_corpus(saved.data, str(new), run_dir)
            OmegaConf.update(saved, name, str(absolute(new)), merge=False)
            continue
        shown = override if "=" in override and override_key(override) == name else f"{override} (it sets {name})"
        raise refuse(shown, f"{name} of the run being resumed from {old.get(name)} to {new}")
    with open_dict(saved):
        saved.paths.output_dir = str(run_dir)
        saved.paths.outputs_root = cfg.paths.outputs_root
        saved.ckpt_path = cfg.ckpt_path
    return saved


def batches_per_epoch(cfg: DictConfig, datamodule: Any) -> int | None:
    """Training batches one process runs per epoch, after limit_train_batches / overfit_batches."""
    devices = cfg.trainer.get("devices")
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(cfg.trainer.get("num_nodes") or 1)
    try:
        n = len(datamodule.train_dataset())
    except TypeError:
        return None
    if cfg.data.layout != "streams":
        n = -(-n // cfg.data.batch_size)
    n = max(1, n // world)
    for key in ("overfit_batches", "limit_train_batches"):
        limit = cfg.trainer.get(key)
        if limit is None or (limit == 0 and key == "overfit_batches"):
            continue
        n = min(n, limit) if isinstance(limit, int) else max(1, int(n * float(limit)))
        if key == "overfit_batches":
            break
    return n


def fit_val_interval(cfg: DictConfig, datamodule: Any) -> None:
    """A step-based validation interval longer than the epoch becomes the epoch (a debug preset, a big batch or
    a short text), so the run validates at each epoch end instead of failing in Lightning's check."""
    interval = cfg.trainer.get("val_check_interval")
    per_epoch = cfg.trainer.get("check_val_every_n_epoch") is not None
    if not isinstance(interval, int) or isinstance(interval, bool) or not per_epoch:
        return
    n = batches_per_epoch(cfg, datamodule)
    if n is not None and interval > n:
        log.info("trainer.val_check_interval=%d is longer than the %d training batches of an epoch: validating at "
                 "each epoch end", interval, n)  # fmt: skip
        with open_dict(cfg):
            cfg.trainer.val_check_interval = n


def fit_log_interval(cfg: DictConfig, datamodule: Any) -> None:
    """A logging interval longer than the epoch becomes the epoch (a short text, a big batch, a debug preset), so
    every epoch logs its training loss (Lightning would otherwise warn that it logs none)."""
    interval = cfg.trainer.get("log_every_n_steps")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        return
    n = batches_per_epoch(cfg, datamodule)
    if n is not None and interval > n:
        log.info("trainer.log_every_n_steps=%d is longer than the %d training batches of an epoch: logging every "
                 "%d", interval, n, n, extra={"file_only": True})  # fmt: skip
        with open_dict(cfg):
            cfg.trainer.log_every_n_steps = n


def failed_error(exc: BaseException, trainer: pl.Trainer, last: LastCheckpoint, out: Path) -> TrainingFailed:
    """The one line for an unexpected exception during training; the traceback goes to train.log."""
    log.error("training failed at step %d", trainer.global_step, exc_info=exc, extra={"file_only": True})
    what = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    if last.last_saved_step is not None:
        saved = f"the last good state is {last.path} (step {last.last_saved_step}); resume with: " \
                f"{command_line('train.py', f'ckpt_path={last.path}')}"  # fmt: skip
    else:
        saved = "no checkpoint was written"
    logfile = out / "train.log"
    where = f" (traceback in {logfile})" if logfile.is_file() else ""
    return TrainingFailed(f"training stopped at step {trainer.global_step} by {what}; {saved}{where}")


def diverged_error(exc: DivergenceError, last: LastCheckpoint, lr: float) -> DivergenceError:
    """The line for a diverged run: what went non-finite, the good checkpoint there is (weights that gave a finite
    loss) or that there is none, and how to go on with a smaller learning rate."""
    what = str(exc).split("; ")[0]  # the model's or the checkpoint writer's first clause: what became non-finite
    kept = last.kept()
    if kept is None:
        return DivergenceError(
            f"{what}; this run has no checkpoint whose weights gave a sane loss, so none is kept; start again with a "
            f"smaller learning rate (e.g. model.lr={lr / 10:g}) or set trainer.gradient_clip_val"
        )
    path, step = kept
    at = f" (step {step})" if step is not None else ""
    return DivergenceError(
        f"{what}; the last good checkpoint is {path}{at}; resume it with a smaller learning rate: "
        f"{command_line('train.py', f'ckpt_path={path}', f'model.lr={lr / 10:g}')} (or set trainer.gradient_clip_val)"
    )


def describe(cfg: DictConfig, out: Path, recipe: str | None = None) -> str:
    """One line saying what this run trains, on what, for how long, and where its files go; ``recipe`` is the
    resumed run's own (its first command chose it), else this command's."""
    from hydra.core.hydra_config import HydraConfig

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


def progress_bar_shown(cfg: DictConfig) -> bool:
    """The live bar only where someone watches it: ``trainer.enable_progress_bar`` and a terminal on stdout. Piped
    into a file or a scheduler's log, a run prints one line per validation instead of the bar's redraws."""
    return bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stdout.isatty()


def check_batch_fits(cfg: DictConfig, net: Any) -> None:
    """data.batch_size against the memory of the device that trains, from the tensor sizes of one training step,
    before any folder holds more than its config (a batch too large fails at once, in one line naming the key)."""
    accelerator = str(cfg.trainer.accelerator)
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    precision = str(cfg.trainer.precision)  # resolved already (resolve_precision)
    elem = 2 if "16" in precision else 8 if "64" in precision else 4
    seq_len = int(cfg.data.seq_len)
    every_char = cfg.data.layout == "streams" or cfg.data.get("targets") == "all"
    per_item = sequence_bytes(net, seq_len, seq_len if every_char else 1, training=True, elem=elem)
    what = "stream chunk" if cfg.data.layout == "streams" else "window"
    check_fits("data.batch_size", int(cfg.data.batch_size), per_item, "cuda" if gpu else "cpu", what)


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any], **overrides: Any) -> pl.Trainer:
    plugins = [AtomicCheckpointIO(), *cluster.lightning_plugins(cfg.trainer)]
    # The DataModule gives every DDP rank its own share itself (training shuffles without a list of every window;
    # validation counts each window once), so Lightning must not swap in its DistributedSampler.
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                       use_distributed_sampler=False, **overrides)  # fmt: skip


def train(cfg: DictConfig, keep_folder: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """Train a model as configured; returns the final metrics and the objects built (for tests and callers).
    The run folder is held (:func:`charlstm.app.rundir.hold`) while it trains and given back when it returns, unless
    ``keep_folder`` (``run()`` still writes the run's result.json into it)."""
    try:
        return _train(cfg)
    finally:
        if not keep_folder:
            let_go()


def _train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    overrides = hydra_overrides()
    if overrides is not None:  # composed by Hydra from the config files (a caller's config may add its own keys)
        check_top_level(cfg, overrides)
    recipe = None
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError(
            f"init_from={cfg.init_from} and ckpt_path={cfg.ckpt_path} together: ckpt_path resumes a run (its weights, "
            "optimizer and schedule), init_from starts a new run from a checkpoint's weights; pass only one"
        )
    if cfg.get("ckpt_path") and overrides is not None:
        run_dir = run_folder_of(resolve_resume(cfg))
        if run_dir is not None:
            cfg = resumed_config(cfg, run_dir, overrides)
            recipe = run_choices(run_dir).get("experiment") or "none"
    requeued = cluster.requeued_checkpoint(Path(cfg.paths.output_dir))
    if requeued is not None:  # a requeued cluster job: the same job again, going on from where it stopped
        with open_dict(cfg):
            cfg.ckpt_path = str(requeued)
    OmegaConf.set_struct(cfg, True)
    validate_train(cfg)
    check_accelerator(str(cfg.trainer.accelerator))
    ckpt_path, ckpt = None, None
    if cfg.get("ckpt_path"):
        ckpt_path = resolve_resume(cfg)
        run_dir = run_folder_of(ckpt_path)
        if run_dir is not None:
            # Continue in the checkpoint's run folder: checkpoints and TensorBoard curves carry on in place.
            with open_dict(cfg):
                cfg.paths.output_dir = str(run_dir)
    # one process trains in a run folder: a second (a resume of a running run, a run given the same hydra.run.dir)
    # is refused here, before it reads its checkpoint or data (a running run's checkpoint keeps moving) or writes
    hold(cfg.paths.output_dir, resuming=ckpt_path is not None)
    if ckpt_path is not None:
        ckpt = checkpoint.load(ckpt_path)
        check_resume_has_work(cfg, ckpt_path, ckpt)
    out = Path(cfg.paths.output_dir)
    new_run_here = ckpt_path is None and overrides is not None and sweep_job() is None and not cluster.requeue_count()
    new_run_here = new_run_here and process_rank() == 0  # DDP ranks > 0 start once rank 0 has written config.yaml
    if new_run_here and holds_a_run(out):  # an explicit hydra.run.dir of an earlier run: files would mix
        raise ConfigError(
            f"run folder {out} already holds a run; resume it with ckpt_path={out / 'checkpoints' / 'last.ckpt'}, "
            "or choose another hydra.run.dir"
        )
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    init = None  # init_from (a new run only: a resumed one has its own weights): the checkpoint and its name
    if cfg.get("init_from") and ckpt_path is None:
        init_path, init_ckpt = finetune.load(str(cfg.init_from), cfg.paths.outputs_root)
        finetune.check_compatible(str(cfg.init_from), init_ckpt["hyper_parameters"], cfg.model, cfg.data.lowercase)
        init = (str(cfg.init_from), init_ckpt)
        with open_dict(cfg):  # recorded in config.yaml, HParams and the checkpoints as what it resolved to
            cfg.init_from = finetune.describe(str(cfg.init_from), init_path)
    datamodule = instantiate(cfg.data, _convert_="all")
    vocab = datamodule.load()
    old_chars = list(init[1]["hyper_parameters"]["vocab"]) if init is not None else []
    if init is not None:  # the checkpoint's chars and the text's: see charlstm.core.finetune
        chars = finetune.extended_vocab(old_chars, vocab.to_list())
        finetune.check_normalized(init[0], str(cfg.model.encoding), old_chars, chars)
        if chars != vocab.to_list():
            with open_dict(cfg):  # config.yaml keeps it, so a resume or eval.py numbers chars the same way
                cfg.data.vocab = chars
            datamodule = instantiate(cfg.data, _convert_="all")
            vocab = datamodule.load()
    model = instantiate(
        cfg.model, _convert_="all", vocab=vocab.to_list(), seq_len=cfg.data.seq_len, layout=cfg.data.layout,
        lowercase=cfg.data.lowercase, init_from=cfg.get("init_from"),
    )  # fmt: skip
    if init is not None:
        finetune.transfer(model.net, finetune.net_state(init[1]), old_chars, vocab.to_list(), init[0])
        log.info("init_from=%s: weights of %s (%d chars; %d new in this text: %s)", init[0], cfg.init_from,
                 len(old_chars), len(vocab) - len(old_chars),
                 char_list(sorted(set(vocab.to_list()) - set(old_chars)), 12) or "none")  # fmt: skip
        del init
    if ckpt is not None:
        check_resume_compatible(ckpt_path, ckpt, model)
    if cfg.sample.length > 0 and cfg.sample.prompt:
        from charlstm.core.sampling import Generator

        check_prompt(Generator.from_module(model), cfg.sample.prompt, "sample.prompt")
    fit_val_interval(cfg, datamodule)
    fit_log_interval(cfg, datamodule)
    with open_dict(cfg):  # `auto`: bf16-mixed where the CPU has native bf16, else 32-true (one log line)
        cfg.trainer.precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    check_batch_fits(cfg, model.net)
    out = Path(cfg.paths.output_dir)
    callbacks = instantiate_named(cfg.get("callbacks"))
    show_bar = progress_bar_shown(cfg)
    if not show_bar:
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    callbacks += [FinalValidation(), ValidationLog()]
    old_lr = ckpt["hyper_parameters"].get("lr") if ckpt is not None else None
    if old_lr is not None and float(old_lr) != float(cfg.model.lr):  # e.g. a diverged run goes on with a smaller one
        log.info("resuming with model.lr=%g (the run had %g): the optimizer's learning rate is scaled by %g",
                 cfg.model.lr, old_lr, cfg.model.lr / old_lr)  # fmt: skip
        callbacks.append(NewLearningRate(float(old_lr), float(cfg.model.lr)))
    for cb in callbacks:
        if isinstance(cb, ConfigHParams):
            cb.config = cfg  # the whole run config goes into TensorBoard's HParams tab
            cb.command_keys = command_line_keys()
    if cfg.trainer.get("enable_checkpointing", True):
        last = ensure_last_checkpoint(callbacks, out / "checkpoints")
    else:
        callbacks = [cb for cb in callbacks if not isinstance(cb, Checkpoint)]
        last = LastCheckpoint(out / "checkpoints")  # never attached: only reports that nothing was saved
    step = int(ckpt["global_step"]) if ckpt is not None else 0
    # TensorBoard's points sit at the steps done: those after the checkpoint's step are the lost ones
    loggers = instantiate_loggers(cfg.get("logger"), purge_step=step + 1 if ckpt is not None else None)
    if not loggers:  # logger=none: nothing to monitor the learning rate into (Lightning would refuse to start)
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    if cfg.trainer.get("enable_model_summary", True):
        callbacks.append(ModelLine())  # the project's one line instead of Lightning's table
    trainer = build_trainer(cfg, callbacks, loggers, enable_progress_bar=show_bar, enable_model_summary=False)

    if trainer.is_global_zero:
        log.info(describe(cfg, out, recipe))
        save_run_config(cfg, out, ckpt_path, step)
    del ckpt
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer,
               "callbacks": callbacks, "loggers": loggers, "output_dir": out}  # fmt: skip
    with sweep_job_ranks(trainer):  # DDP in a multirun job: its other ranks run this job, then end
        try:
            with warnings.catch_warnings():
                # A resumed run writes into its own checkpoint folder on purpose.
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
                trainer.fit(
                    model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True
                )
        except (KeyboardInterrupt, SystemExit) as exc:
            raise reached(interrupted_error(exc, trainer, last), objects) from None
        except DivergenceError as exc:
            raise reached(diverged_error(exc, last, float(cfg.model.lr)), objects) from None
        except CharLSTMError as err:
            reached(err, objects)
            raise
        except Exception as exc:  # a bug or a library failure: say where the last good state is
            raise reached(failed_error(exc, trainer, last, out), objects) from exc

        if "val/bpc" not in trainer.callback_metrics and trainer.enable_validation and trainer.global_step > 0:
            # no validation fell inside the run (e.g. check_val_every_n_epoch beyond max_epochs): score it once now
            trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = scalar_metrics(trainer)
    if getattr(datamodule, "test_ids", None) is not None and trainer.global_step > 0:
        metrics.update(score_test(trainer, model, datamodule))
    return metrics, objects


def score_test(trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any) -> dict[str, float]:
    """test/* on the held-out text (data.test_fraction), scored once on the best checkpoint (the last weights when
    the run kept none); the model keeps its last weights for the sample."""
    best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.best_model_path), "")  # fmt: skip
    last_weights = copy.deepcopy(model.state_dict())
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
    model.load_state_dict(last_weights)
    log.info("test text (%d chars) scored on %s", len(datamodule.test_ids), best or "the last weights")
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}


def say(line: str) -> None:
    """A line for the user: on the console and in train.log (printed when logging is not set up, e.g. in tests)."""
    if logging.getLogger().handlers:
        log.info(line)
    else:
        print(line, flush=True)


def report(cfg: DictConfig, metrics: dict[str, float], objects: dict[str, Any]) -> None:
    """Say where the run's files are, its validation bits/char and a short sample."""
    from charlstm.core.sampling import Generator, printable

    trainer: pl.Trainer = objects["trainer"]
    out: Path = objects["output_dir"]
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
        gen = Generator.from_module(objects["model"])
        prompt = gen.clean_prompt(cfg.sample.prompt or sample_prompt(objects["datamodule"]))
        text = gen.generate(prompt, cfg.sample.length, cfg.sample.temperature, seed=cfg.seed or 0)[0]
        say(f"sample (temperature {cfg.sample.temperature}):\n{printable(prompt.lstrip(chr(10)) + text)}")


def remove_if_empty(folder: Path, root: Path) -> None:
    """A run refused before it started leaves no folder behind (only Hydra's copy of the config and the log),
    nor the date folders above it that it alone made."""
    from charlstm.app.rundir import is_unused

    if not is_unused(folder):
        return
    shutil.rmtree(folder, ignore_errors=True)
    root, parent = root.resolve(), folder.resolve().parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
        parent = parent.parent


def hydra_run_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def sweep_job() -> tuple[int, list[str], Path] | None:
    """(job number, its overrides, the sweep folder) when this run is a job of a multirun, else None."""
    from charlstm.app.jobranks import multirun_job

    hydra_cfg = multirun_job()
    if hydra_cfg is None:
        return None
    return int(hydra_cfg.job.num), list(hydra_cfg.overrides.task), Path(str(hydra_cfg.sweep.dir))


def run_result(
    cfg: DictConfig,
    state: str,
    seconds: float,
    objects: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """What ``result.json`` holds for this run: its swept settings, outcome, numbers and validation curve."""
    from charlstm.app.rundir import override_key, swept_overrides

    job = sweep_job()
    overrides = swept_overrides(hydra_overrides() or [])
    params = {}
    for override in overrides:
        key = override_key(override)
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        params[key] = value if isinstance(value, int | float | str | bool) else override.split("=", 1)[-1]
    result: dict[str, Any] = {"job": job[0] if job else None, "state": state, "overrides": overrides,
                              "params": params, "metrics": metrics or {}}  # fmt: skip
    if objects is not None:
        trainer, callbacks = objects["trainer"], objects["callbacks"]
        if metrics is None:  # a stopped run: what it had reached
            result["metrics"] = scalar_metrics(trainer)
        history = next((cb.history for cb in callbacks if isinstance(cb, ValidationLog)), [])
        result.update(steps=trainer.global_step, train_seconds=objects["model"].train_seconds(),
                      run_dir=str(objects["output_dir"]), history=[list(p) for p in history])  # fmt: skip
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
    result = run_result(cfg, state, seconds, getattr(exc, "objects", None), error=exc)
    write_result(folder, result)
    if not interrupted:
        if not isinstance(exc, CharLSTMError):
            log.error("sweep job failed", exc_info=exc, extra={"file_only": True})
        job = f"job {result['job']} ({' '.join(result['overrides']) or 'no overrides'})"
        if logging.getLogger().handlers:
            logging.getLogger("charlstm").error("%s: %s", job, result["error"], extra={"file_only": True})
        print(f"{'pruned' if pruned else 'error'}: {job}: {result['error']}", file=sys.stderr, flush=True)


@exit_on_error
def run(cfg: DictConfig) -> float | None:
    """What ``python train.py`` does: train, report, return the optimized metric for sweepers.

    Each run leaves ``result.json`` in its folder. A job of a multirun that fails is recorded there and returns
    None, so the sweep goes on to the next job (Ctrl-C or SIGTERM still stops the sweep, after a summary of the
    jobs so far).
    """
    try:
        return _run(cfg)
    finally:
        let_go()  # the run folder, held since train() took it


def _run(cfg: DictConfig) -> float | None:
    route_library_logs()
    quiet_known_warnings()
    started = time.monotonic()
    folder, job = hydra_run_dir(), sweep_job()
    resuming = folder is not None and holds_a_run(folder)  # a resume runs in the run's own folder
    try:
        try:
            search_needs_multirun(cfg)
            metrics, objects = train(cfg, keep_folder=True)
        except KeyboardInterrupt:
            raise TrainingInterrupted("SIGINT before training started; nothing to save", signal.SIGINT) from None
        except MisconfigurationException as err:
            # Lightning's own checks of trainer settings: a config mistake like any other.
            raise ConfigError(f"{' '.join(str(err).split())} (a trainer setting, see configs/trainer/)") from None
    except BaseException as exc:
        if folder is None or process_rank() != 0:
            raise
        if job is None:
            remove_if_empty(folder, Path(cfg.paths.outputs_root))
            # a resume refused before it trained (another process holds the run, a changed setting) leaves the run's
            # result.json as it was; one that stopped while training keeps the run's history in it
            refused = isinstance(exc, ConfigError | CheckpointError) or not holds(folder)
            if folder.is_dir() and not (resuming and refused):
                from charlstm.app.summary import FAILED, INTERRUPTED, read_result, write_result

                state = INTERRUPTED if isinstance(exc, TrainingInterrupted) else FAILED
                objects = getattr(exc, "objects", None)  # what the run reached, when it stopped while training
                result = run_result(cfg, state, time.monotonic() - started, objects, error=exc)
                earlier = read_result(folder) if resuming and objects is None else None
                if earlier:
                    result = {**earlier, **{k: result[k] for k in ("state", "error", "error_type")}}
                write_result(folder, result)
            raise
        record_failure(cfg, exc, folder, time.monotonic() - started)
        if isinstance(exc, Exception) and not isinstance(exc, TrainingInterrupted):
            return None  # on to the next job
        from charlstm.app.summary import summarize

        if OmegaConf.select(cfg, "optuna.trial") is None:  # an Optuna search's sweeper writes its own
            summarize(job[2], cfg.get("optimized_metric") or "val/bpc_best")  # the jobs so far
        raise
    if objects["trainer"].is_global_zero:
        report(cfg, metrics, objects)
        if folder is not None:
            from charlstm.app.pruning import pruned_at
            from charlstm.app.summary import COMPLETE, PRUNED, write_result

            # a trial the Optuna pruner stopped ends like any run, recorded as pruned
            step = pruned_at(objects["callbacks"])
            result = run_result(cfg, COMPLETE if step is None else PRUNED, time.monotonic() - started, objects, metrics)
            # a resumed run's result goes beside its checkpoints; a sweep job's stays in the job folder
            where = folder if job is not None else objects["output_dir"]
            write_result(where, result if step is None else {**result, "pruned_at_step": step})
    return metrics.get(cfg.get("optimized_metric") or "")
