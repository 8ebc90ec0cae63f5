"""train(cfg) -> (metrics, run): the whole training run as one plain function of named steps; run(cfg) is what
``python train.py`` does with it (the report, result.json and the exit path)."""

from __future__ import annotations

import copy
import logging
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from charlstm.app import cluster
from charlstm.app.build import TrainingRun, build_run, check_batch_fits
from charlstm.app.failures import diverged_error, failed_error, interrupted_error, reached
from charlstm.app.hydrajob import hydra_overrides, hydra_run_dir, sweep_job
from charlstm.app.jobranks import sweep_job_ranks
from charlstm.app.logs import quiet_known_warnings, route_library_logs
from charlstm.app.report import (
    describe,
    record_failure,
    record_finished,
    record_stopped,
    report,
    scalar_metrics,
)
from charlstm.app.resume import check_resume_compatible, load_resumed
from charlstm.app.runconfig import fitted, run_config, save_run_config, with_values
from charlstm.app.rundir import hold, holds_a_run, let_go
from charlstm.app.search import search_needs_multirun
from charlstm.core import finetune
from charlstm.core.errors import (
    CharLSTMError,
    ConfigError,
    DivergenceError,
    TrainingInterrupted,
    exit_on_error,
    process_rank,
)
from charlstm.core.vocab import CharVocab, char_list
from charlstm.training.callbacks import check_prompt

log = logging.getLogger(__name__)

# init_from's name as given and its checkpoint
InitFrom = tuple[str, dict[str, Any]]


def train(cfg: DictConfig, keep_folder: bool = False) -> tuple[dict[str, float], TrainingRun]:
    """Train a model as configured; returns the final metrics and what was built (for tests and callers). ``cfg``
    is left as it is: the config the run trained with is the run's ``cfg``. The run folder is held
    (:func:`charlstm.app.rundir.hold`) while it trains and given back when it returns, unless ``keep_folder``
    (``run()`` still writes the run's result.json into it)."""
    try:
        return _train(cfg)
    finally:
        if not keep_folder:
            let_go()


def _train(cfg: DictConfig) -> tuple[dict[str, float], TrainingRun]:
    overrides = hydra_overrides()
    cfg, recipe, ckpt_path = run_config(cfg, overrides)
    # one process trains in a run folder: a second (a resume of a running run, a run given the same hydra.run.dir)
    # is refused here, before it reads its checkpoint or data (a running run's checkpoint keeps moving) or writes
    hold(cfg.paths.output_dir, resuming=ckpt_path is not None)
    ckpt = load_resumed(cfg, ckpt_path)
    check_new_run_folder(Path(cfg.paths.output_dir), new_run=ckpt_path is None and overrides is not None)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    cfg, init = start_weights(cfg, resuming=ckpt_path is not None)
    cfg, datamodule, vocab = load_data(cfg, init)
    model = build_model(cfg, vocab, init)
    del init
    if ckpt is not None:
        check_resume_compatible(ckpt_path, ckpt, model)
    if cfg.sample.length > 0 and cfg.sample.prompt:
        from charlstm.core.sampling import Generator

        check_prompt(Generator.from_module(model), cfg.sample.prompt, "sample.prompt")
    cfg = fitted(cfg, datamodule)
    check_batch_fits(cfg, model.net)
    run = build_run(cfg, datamodule, model, ckpt)

    if run.trainer.is_global_zero:
        log.info(describe(cfg, run.output_dir, recipe))
        save_run_config(cfg, run.output_dir, ckpt_path, int(ckpt["global_step"]) if ckpt is not None else 0)
    del ckpt
    with sweep_job_ranks(run.trainer):  # DDP in a multirun job: its other ranks run this job, then end
        fit(run, ckpt_path)
    metrics = scalar_metrics(run.trainer)
    if getattr(datamodule, "test_ids", None) is not None and run.trainer.global_step > 0:
        metrics.update(score_test(run.trainer, model, datamodule))
    return metrics, run


def check_new_run_folder(out: Path, new_run: bool) -> None:
    """A new run started by a command of its own must not go into an earlier run's folder (an explicit
    hydra.run.dir): their files would mix. DDP ranks > 0 start once rank 0 has written config.yaml."""
    new_run_here = new_run and sweep_job() is None and not cluster.requeue_count() and process_rank() == 0
    if new_run_here and holds_a_run(out):
        raise ConfigError(
            f"run folder {out} already holds a run; resume it with ckpt_path={out / 'checkpoints' / 'last.ckpt'}, "
            "or choose another hydra.run.dir"
        )


def start_weights(cfg: DictConfig, resuming: bool) -> tuple[DictConfig, InitFrom | None]:
    """``init_from`` (a new run only: a resumed one has its own weights): its name and checkpoint, and the config
    recording what it resolved to (in config.yaml, HParams and the checkpoints)."""
    if not cfg.get("init_from") or resuming:
        return cfg, None
    name = str(cfg.init_from)
    init_path, init_ckpt = finetune.load(name, cfg.paths.outputs_root)
    finetune.check_compatible(name, init_ckpt["hyper_parameters"], cfg.model, cfg.data.lowercase)
    return with_values(cfg, {"init_from": finetune.describe(name, init_path)}), (name, init_ckpt)


def load_data(cfg: DictConfig, init: InitFrom | None) -> tuple[DictConfig, Any, CharVocab]:
    """The DataModule with its text loaded, and its vocabulary. Fine-tuning, the vocabulary is the checkpoint's chars
    and the text's new ones (see charlstm.core.finetune), kept as ``data.vocab`` so that config.yaml, a resume and
    eval.py number chars the same way."""
    datamodule = instantiate(cfg.data, _convert_="all")
    vocab = datamodule.load()
    if init is None:
        return cfg, datamodule, vocab
    old_chars = list(init[1]["hyper_parameters"]["vocab"])
    chars = finetune.extended_vocab(old_chars, vocab.to_list())
    finetune.check_normalized(init[0], str(cfg.model.encoding), old_chars, chars)
    if chars == vocab.to_list():
        return cfg, datamodule, vocab
    cfg = with_values(cfg, {"data.vocab": chars})
    datamodule = instantiate(cfg.data, _convert_="all")
    return cfg, datamodule, datamodule.load()


def build_model(cfg: DictConfig, vocab: CharVocab, init: InitFrom | None) -> pl.LightningModule:
    """The LightningModule for ``vocab``; fine-tuning, with the weights of ``init_from``."""
    model = instantiate(
        cfg.model, _convert_="all", vocab=vocab.to_list(), seq_len=cfg.data.seq_len, layout=cfg.data.layout,
        lowercase=cfg.data.lowercase, init_from=cfg.get("init_from"),
    )  # fmt: skip
    if init is not None:
        old_chars = list(init[1]["hyper_parameters"]["vocab"])
        finetune.transfer(model.net, finetune.net_state(init[1]), old_chars, vocab.to_list(), init[0])
        log.info("init_from=%s: weights of %s (%d chars; %d new in this text: %s)", init[0], cfg.init_from,
                 len(old_chars), len(vocab) - len(old_chars),
                 char_list(sorted(set(vocab.to_list()) - set(old_chars)), 12) or "none")  # fmt: skip
    return model


def fit(run: TrainingRun, ckpt_path: Path | None) -> None:
    """Fit the run (from ``ckpt_path`` when resuming); a stop while training raises one line carrying the run
    (:func:`~charlstm.app.failures.reached`). A run that no validation fell inside is scored once at its end."""
    trainer, last = run.trainer, run.last
    try:
        with warnings.catch_warnings():
            # A resumed run writes into its own checkpoint folder on purpose.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(
                run.model, datamodule=run.datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True
            )
    except (KeyboardInterrupt, SystemExit) as exc:
        raise reached(interrupted_error(exc, trainer, last), run) from None
    except DivergenceError as exc:
        raise reached(diverged_error(exc, last, float(run.cfg.model.lr)), run) from None
    except CharLSTMError as err:
        reached(err, run)
        raise
    except Exception as exc:  # a bug or a library failure: say where the last good state is
        raise reached(failed_error(exc, trainer, last, run.output_dir), run) from exc

    if "val/bpc" not in trainer.callback_metrics and trainer.enable_validation and trainer.global_step > 0:
        # no validation fell inside the run (e.g. check_val_every_n_epoch beyond max_epochs): score it once now
        trainer.validate(run.model, datamodule=run.datamodule, verbose=False)


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
        metrics, training_run = train_command(cfg)
    except BaseException as exc:
        if folder is None or process_rank() != 0:
            raise
        if job is None:
            remove_if_empty(folder, Path(cfg.paths.outputs_root))
            record_stopped(cfg, exc, folder, resuming, time.monotonic() - started)
            raise
        record_failure(cfg, exc, folder, time.monotonic() - started)
        if isinstance(exc, Exception) and not isinstance(exc, TrainingInterrupted):
            return None  # on to the next job
        from charlstm.app.summary import summarize

        if OmegaConf.select(cfg, "optuna.trial") is None:  # an Optuna search's sweeper writes its own
            summarize(job[2], cfg.get("optimized_metric") or "val/bpc_best")  # the jobs so far
        raise
    if training_run.trainer.is_global_zero:
        report(cfg, metrics, training_run)
        if folder is not None:
            record_finished(cfg, training_run, metrics, folder, job is not None, time.monotonic() - started)
    return metrics.get(cfg.get("optimized_metric") or "")


def train_command(cfg: DictConfig) -> tuple[dict[str, float], TrainingRun]:
    """train() for the command line: Ctrl-C before training and Lightning's own checks of trainer settings are one
    line like any other stop or config mistake."""
    try:
        search_needs_multirun(cfg)
        return train(cfg, keep_folder=True)
    except KeyboardInterrupt:
        raise TrainingInterrupted("SIGINT before training started; nothing to save", signal.SIGINT) from None
    except MisconfigurationException as err:
        raise ConfigError(f"{' '.join(str(err).split())} (a trainer setting, see configs/trainer/)") from None
