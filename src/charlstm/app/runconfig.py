"""The config a run trains with: checked, a resumed run's own, its settings fitted to the data, and config.yaml.

Each step returns a new config (``with_values``); the caller's config is never changed. The final one is what
config.yaml, TensorBoard's HParams tab and the checkpoints record.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from charlstm.app import cluster
from charlstm.app.config import check_top_level, validate_train
from charlstm.app.resume import resolve_resume, resumed_config, run_choices
from charlstm.app.rundir import absolute, run_folder_of
from charlstm.core.errors import ConfigError
from charlstm.core.fileio import atomic_write_text
from charlstm.core.hardware import resolve_precision
from charlstm.data.prepared import text_sha256

# The log lines of a run come from the training command's logger, wherever they are written.
log = logging.getLogger("charlstm.app.train")


def with_values(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with the dotted keys of ``values`` set (added where the config has no such key)."""
    new = copy.deepcopy(cfg)
    with open_dict(new):
        for key, value in values.items():
            OmegaConf.update(new, key, value, merge=False)
    return new


def check_accelerator(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible to torch "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda or 'no'}); "
            "run on the CPU with trainer=cpu (or trainer.accelerator=cpu)"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps but MPS is not available; use trainer.accelerator=cpu")


def run_config(cfg: DictConfig, overrides: list[str] | None) -> tuple[DictConfig, str | None, Path | None]:
    """The checked config this run starts from, the recipe a resumed run's first command chose (None for a new run)
    and the checkpoint it resumes (None for a new run).

    A resume under Hydra goes on with the run's own config (:func:`~charlstm.app.resume.resumed_config`) in the
    run's folder; a requeued cluster job resumes the checkpoint it left.
    """
    if overrides is not None:  # composed by Hydra from the config files (a caller's config may add its own keys)
        check_top_level(cfg, overrides)
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError(
            f"init_from={cfg.init_from} and ckpt_path={cfg.ckpt_path} together: ckpt_path resumes a run (its weights, "
            "optimizer and schedule), init_from starts a new run from a checkpoint's weights; pass only one"
        )
    recipe = None
    if cfg.get("ckpt_path") and overrides is not None:
        run_dir = run_folder_of(resolve_resume(cfg))
        if run_dir is not None:
            cfg = resumed_config(cfg, run_dir, overrides)
            recipe = run_choices(run_dir).get("experiment") or "none"
    requeued = cluster.requeued_checkpoint(Path(cfg.paths.output_dir))
    # a requeued cluster job: the same job again, going on from where it stopped
    cfg = with_values(cfg, {"ckpt_path": str(requeued)} if requeued is not None else {})
    OmegaConf.set_struct(cfg, True)
    validate_train(cfg)
    check_accelerator(str(cfg.trainer.accelerator))
    if not cfg.get("ckpt_path"):
        return cfg, recipe, None
    ckpt_path = resolve_resume(cfg)
    run_dir = run_folder_of(ckpt_path)
    if run_dir is not None:  # continue in the checkpoint's run folder: checkpoints and TensorBoard curves carry on
        cfg = with_values(cfg, {"paths.output_dir": str(run_dir)})
    return cfg, recipe, ckpt_path


def fitted(cfg: DictConfig, datamodule: Any) -> DictConfig:
    """The trainer settings fitted to the data and the machine: intervals longer than an epoch become the epoch, and
    ``trainer.precision=auto`` what it resolves to (bf16-mixed where the CPU has native bf16, else 32-true)."""
    values = {}
    val_interval = fit_val_interval(cfg, datamodule)
    if val_interval is not None:
        values["trainer.val_check_interval"] = val_interval
    log_interval = fit_log_interval(cfg, datamodule)
    if log_interval is not None:
        values["trainer.log_every_n_steps"] = log_interval
    values["trainer.precision"] = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    return with_values(cfg, values)


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


def fit_val_interval(cfg: DictConfig, datamodule: Any) -> int | None:
    """The epoch's batches when a step-based validation interval is longer than the epoch (a debug preset, a big
    batch or a short text), so the run validates at each epoch end instead of failing in Lightning's check; else
    None (the interval stays)."""
    interval = cfg.trainer.get("val_check_interval")
    per_epoch = cfg.trainer.get("check_val_every_n_epoch") is not None
    if not isinstance(interval, int) or isinstance(interval, bool) or not per_epoch:
        return None
    n = batches_per_epoch(cfg, datamodule)
    if n is None or interval <= n:
        return None
    log.info("trainer.val_check_interval=%d is longer than the %d training batches of an epoch: validating at "
             "each epoch end", interval, n)  # fmt: skip
    return n


def fit_log_interval(cfg: DictConfig, datamodule: Any) -> int | None:
    """The epoch's batches when the logging interval is longer than the epoch (a short text, a big batch, a debug
    preset), so every epoch logs its training loss (Lightning would otherwise warn that it logs none); else None."""
    interval = cfg.trainer.get("log_every_n_steps")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        return None
    n = batches_per_epoch(cfg, datamodule)
    if n is None or interval <= n:
        return None
    log.info("trainer.log_every_n_steps=%d is longer than the %d training batches of an epoch: logging every "
             "%d", interval, n, n, extra={"file_only": True})  # fmt: skip
    return n


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
