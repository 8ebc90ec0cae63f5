"""train(cfg) -> (metrics, objects): the whole training run as one plain function; main() is the Hydra face."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from charlstm import checkpoint
from charlstm.config import validate_train
from charlstm.errors import CharLSTMError, CheckpointError, ConfigError, exit_on_error

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
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def check_resume_compatible(ckpt_path: Path, model: pl.LightningModule) -> None:
    """A resumed run must have the checkpoint's vocabulary and model shape."""
    hp = checkpoint.load(ckpt_path)["hyper_parameters"]
    mine = model.hparams
    if list(hp["vocab"]) != list(mine.vocab):
        raise CheckpointError(
            f"checkpoint {ckpt_path} was trained on another vocabulary ({len(hp['vocab'])} chars, this corpus "
            f"has {len(mine.vocab)}); resume with the same data settings or start a new run without ckpt_path"
        )
    for key in ("encoding", "units", "layers", "embed_dim"):
        if hp.get(key) != mine.get(key):
            raise CheckpointError(
                f"checkpoint {ckpt_path} has model.{key}={hp.get(key)!r} but this run has {mine.get(key)!r}; "
                f"resume with model.{key}={hp.get(key)} or start a new run without ckpt_path"
            )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train a model as configured; returns the final metrics and the objects built (for tests and callers)."""
    validate_train(cfg)
    check_accelerator(str(cfg.trainer.accelerator))
    ckpt_path = None
    if cfg.get("ckpt_path"):
        ckpt_path = checkpoint.resolve(cfg.ckpt_path, cfg.paths.outputs_root)
        # Continue in the checkpoint's run folder: checkpoints and TensorBoard curves carry on in place.
        with open_dict(cfg):
            cfg.paths.output_dir = str(ckpt_path.resolve().parent.parent)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data, _convert_="all")
    vocab = datamodule.load()
    model = instantiate(
        cfg.model, _convert_="all", vocab=vocab.to_list(), seq_len=cfg.data.seq_len, layout=cfg.data.layout,
        lowercase=cfg.data.lowercase,
    )  # fmt: skip
    if ckpt_path is not None:
        check_resume_compatible(ckpt_path, model)
    callbacks = instantiate_named(cfg.get("callbacks"))
    loggers = instantiate_named(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer,
               "callbacks": callbacks, "loggers": loggers, "output_dir": out}  # fmt: skip
    return metrics, objects


def report(cfg: DictConfig, metrics: dict[str, float], objects: dict[str, Any]) -> None:
    """Print where the run's files are, its validation bits/char and a short sample."""
    from charlstm.sampling import Generator

    trainer: pl.Trainer = objects["trainer"]
    out: Path = objects["output_dir"]
    ckpt_cb = trainer.checkpoint_callback
    lines = [f"run folder:   {out}"]
    if ckpt_cb is not None and getattr(ckpt_cb, "dirpath", None):
        lines.append(f"checkpoints:  {ckpt_cb.dirpath}  (last.ckpt, best: {Path(ckpt_cb.best_model_path).name})")
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
        raise CharLSTMError("training interrupted") from None
    if objects["trainer"].is_global_zero:
        report(cfg, metrics, objects)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return value
