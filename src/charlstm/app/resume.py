"""Resuming a run (``ckpt_path``): which checkpoint, whether it fits this run and has work left, and the config the
resumed run goes on with (its own, with the command line's safe overrides on top)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from charlstm.app.rundir import absolute, check_moved_corpus, load_run_config, override_key
from charlstm.core import checkpoint
from charlstm.core.errors import CheckpointError, ConfigError, process_rank
from charlstm.core.vocab import char_list

# Set by rank 0 when it resolves `ckpt_path=last`, so DDP ranks started later resume the very same file: Lightning
# starts them with the command line and the environment only, and `last` resolved again may name a newer file.
RESUME_ENV = "CHARLSTM_RESUME_PATH"

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


def load_resumed(cfg: DictConfig, ckpt_path: Path | None) -> dict[str, Any] | None:
    """The checkpoint a resumed run goes on from (None for a new run), refused when it has no work left."""
    if ckpt_path is None:
        return None
    ckpt = checkpoint.load(ckpt_path)
    check_resume_has_work(cfg, ckpt_path, ckpt)
    return ckpt


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


def refusal(override: str, what: str, run_dir: Path) -> ConfigError:
    return ConfigError(
        f"{override} would change {what} ({run_dir / 'config.yaml'}); resume without it (the run keeps its own "
        "settings), or start a new run without ckpt_path"
    )


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
    saved = load_run_config(run_dir)
    choices = {str(k): str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    mine = plain(cfg)
    now, old = leaves(mine), leaves(OmegaConf.to_container(saved, resolve=True))
    groups = [o for o in overrides if override_key(o) in choices or override_key(o) in RESUME_GROUPS]
    asked = settings_asked([o for o in overrides if o not in groups], now.keys() | old.keys())
    take_group_choices(cfg, saved, groups, choices, run_dir, mine, asked)
    for override in overrides:
        if override_key(override) == "trainer":
            for name in TRAINER_HARDWARE:
                if name in cfg.trainer:
                    OmegaConf.update(saved, f"trainer.{name}", cfg.trainer[name], force_add=True)
    take_settings(cfg, saved, asked, now, old, run_dir)
    with open_dict(saved):
        saved.paths.output_dir = str(run_dir)
        saved.paths.outputs_root = cfg.paths.outputs_root
        saved.ckpt_path = cfg.ckpt_path
    return saved


def settings_asked(overrides: list[str], names: set[str]) -> dict[str, str]:
    """Setting -> the override that asks for it: every key of ``names`` an override names (the last override of a
    key is the one that counts)."""
    asked: dict[str, str] = {}
    for override in reversed(overrides):
        key = override_key(override)
        for name in names:
            if name == key or name.startswith(key + "."):
                asked.setdefault(name, override)
    return asked


def take_group_choices(
    cfg: DictConfig,
    saved: DictConfig,
    groups: list[str],
    choices: dict[str, str],
    run_dir: Path,
    mine: dict[str, Any],
    asked: dict[str, str],
) -> None:
    """The last choice of each config group on the command line: a safe group (logger=csv, callbacks=none) goes into
    ``saved``; a recipe group must be the run's own choice; any other group adds the settings it changes to
    ``asked``. ``trainer=NAME`` is left to the hardware keys."""
    old_choices, now = run_choices(run_dir), leaves(mine)
    before: dict[str, Any] | None = None
    for override in [o for i, o in enumerate(groups) if override_key(o) not in map(override_key, groups[i + 1 :])]:
        group = override_key(override)
        if group == "trainer":
            continue
        if is_safe(group):
            OmegaConf.update(saved, group, OmegaConf.select(cfg, group), merge=False, force_add=True)
            continue
        if group in RESUME_GROUPS and old_choices:  # the run's own choice is known: the choice is what counts
            if choices.get(group) != old_choices.get(group):
                raise refusal(override, f"the {group} of the run being resumed from {old_choices.get(group)} to "
                                        f"{choices.get(group)}", run_dir)  # fmt: skip
            continue
        # any other group (debug=fast), or the run's choice unknown: the settings the choice gives another value than
        # the plain config has (a group of the global package, e.g. a recipe, may set any of them)
        if before is None:
            before = leaves(plain(compose(config_name=HydraConfig.get().job.config_name, overrides=[])))
        for name in now.keys() | before.keys():
            if now.get(name) != before.get(name) and (group not in mine or name.startswith(group + ".")):
                asked.setdefault(name, override)


def take_settings(
    cfg: DictConfig, saved: DictConfig, asked: dict[str, str], now: dict[str, Any], old: dict[str, Any], run_dir: Path
) -> None:
    """The settings the command line asks for: a safe one goes into ``saved``, the run's own value (or its corpus
    where it is now) is accepted, any other change is refused."""
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
        raise refusal(shown, f"{name} of the run being resumed from {old.get(name)} to {new}", run_dir)
