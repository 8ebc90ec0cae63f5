"""The job's side of an Optuna search: a training run that is a trial reports val/loss to its trial after every
validation and stops cleanly when the study's pruner finds it hopeless. The run finds its trial through
``optuna.storage``, ``optuna.study`` and ``optuna.trial`` (set by the sweeper, hydra_plugins.charlstm_optuna), so
it may run in any process that reaches the storage.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from charlstm.core.errors import ConfigError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# the trial user attribute in which a run records the step at which the pruner stopped it
PRUNED_AT = "pruned_at_step"


def quiet_optuna() -> None:
    """Optuna's own INFO lines (study created, trial finished) repeat what the search prints itself."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # its matplotlib plots


def make_pruner(settings: dict[str, Any]) -> optuna.pruners.BasePruner:
    import optuna

    name = settings.get("name", "median")
    if name in (None, "none"):
        return optuna.pruners.NopPruner()
    if name != "median":
        raise ConfigError(f"hydra.sweeper.pruner.name={name} is not known; use median or none")
    return optuna.pruners.MedianPruner(
        n_startup_trials=int(settings.get("startup_trials", 3)), n_warmup_steps=int(settings.get("warmup_steps", 0))
    )


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial ``number`` of the study (what its per-trial calls take)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


class OptunaPruning(Callback):
    """Reports ``monitor`` to the study's trial after every validation and stops training, cleanly, when the
    pruner finds the trial hopeless (the run ends as usual: checkpoints, report, its metric returned).

    Inert without a trial (``python train.py hparams_search=lstm`` without ``-m``). Rank 0 talks to the study
    and every rank follows its decision.
    """

    def __init__(
        self, storage: str | None = None, study: str | None = None, trial: int | None = None, monitor: str = "val/loss"
    ) -> None:
        self.storage, self.study_name, self.number, self.monitor = storage, study, trial, monitor
        self.pruned_at: int | None = None
        self._trial: optuna.Trial | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.number is None or not trainer.is_global_zero:
            return
        import optuna

        if not (self.storage and self.study_name):
            raise ConfigError("optuna.trial is set without optuna.storage and optuna.study; run the search with -m")
        quiet_optuna()
        try:
            storage = optuna.storages.RDBStorage(self.storage)
            study = optuna.load_study(study_name=self.study_name, storage=storage)
        except KeyError:
            raise ConfigError(
                f"optuna.study={self.study_name} is not in {self.storage}; run the search with -m"
            ) from None
        study.pruner = make_pruner(study.user_attrs.get("pruner", {}))
        try:
            self._trial = optuna.Trial(study, trial_id(storage, self.study_name, int(self.number)))
        except KeyError:
            raise ConfigError(f"optuna.trial={self.number} is not a trial of study {self.study_name}") from None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.number is None or self.pruned_at is not None:
            return
        prune = False
        value = trainer.callback_metrics.get(self.monitor)
        if self._trial is not None and value is not None and math.isfinite(float(value)):
            self._trial.report(float(value), step=trainer.global_step)
            prune = self._trial.should_prune()
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if not prune:
            return
        self.pruned_at = trainer.global_step
        trainer.should_stop = True
        if self._trial is not None:
            self._trial.set_user_attr(PRUNED_AT, trainer.global_step)
            log.info(
                "trial %s pruned at step %d: %s %.4f is worse than the median of the complete trials there; stopping",
                self.number, trainer.global_step, self.monitor, float(value),
            )  # fmt: skip


def pruned_at(callbacks: list[Any]) -> int | None:
    """The step at which the run's pruning callback stopped it (None: not pruned, or not a trial)."""
    return next((cb.pruned_at for cb in callbacks if isinstance(cb, OptunaPruning) and cb.pruned_at is not None), None)
