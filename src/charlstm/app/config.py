"""Checks every configured value before any work starts; a bad one is one line naming key, value and the fix."""

from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from charlstm.core.errors import ConfigError
from charlstm.core.net import ENCODINGS
from charlstm.core.rules import INT_GE0, INT_GE1, Rule, is_int, is_number, refuse
from charlstm.core.sampling import SAMPLING_RULES
from charlstm.data.windows import LAYOUTS, TARGETS

INT_GE1_OR_NULL = ("int?", lambda v: v >= 1, "null or an integer >= 1")
FRACTION_OPEN = ("float", lambda v: 0 < v < 1, "a number with 0 < value < 1")
DROPOUT = ("float", lambda v: 0 <= v < 1, "a number with 0 <= value < 1")
PRECISIONS = (
    "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 32, 16, 64, "32", "16", "64", "bf16",
    "auto",
)  # fmt: skip
STRATEGIES = (
    "auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true",
    "ddp_find_unused_parameters_false", "fsdp", "deepspeed", "single_device",
)  # fmt: skip
_DURATION = re.compile(r"^\d+:\d{1,2}:\d{1,2}:\d{1,2}$")


def _batches_limit(v: Any) -> bool:
    """Lightning's limit_*_batches / overfit_batches: a count (int >= 0) or a fraction in [0, 1]."""
    return (is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)


BATCHES = ("any", lambda v: v is None or _batches_limit(v), "a count >= 0 or a fraction in [0, 1]")


def _devices(v: Any) -> bool:
    if isinstance(v, ListConfig | list):
        return len(v) > 0 and all(is_int(d) and d >= 0 for d in v)
    return v == "auto" or (is_int(v) and (v >= 1 or v == -1)) or (isinstance(v, str) and v.strip() != "")


# key -> Rule (charlstm.core.rules: kind, rule, what is allowed); keys absent from a config are skipped. This table is
# the one place a configured value of a run is checked: the classes it configures take their values as given.
TRAIN_RULES: dict[str, Rule] = {
    # data
    "data.source": ("choice", ("play", "file"), "play or file"),
    "data.play": ("str", lambda v: v.strip() != "", "a play's name (e.g. macbeth) or all"),
    "data.sha256": ("str?", lambda v: re.fullmatch(r"[0-9a-fA-F]{64}", v) is not None, "null or 64 hex digits"),
    "data.errors": ("choice", ("strict", "replace"), "strict or replace"),
    "data.lowercase": ("bool", None, "true or false"),
    "data.max_chars": INT_GE1_OR_NULL,
    "data.seq_len": INT_GE1,
    "data.stride": INT_GE1,
    "data.layout": ("choice", LAYOUTS, "windows or streams"),
    "data.targets": ("choice", TARGETS, "last or all"),
    "data.val_fraction": FRACTION_OPEN,
    "data.test_fraction": ("float", lambda v: 0 <= v < 1, "a number with 0 <= value < 1 (0: no test text)"),
    "data.val_max_windows": INT_GE1_OR_NULL,
    "data.val_context": INT_GE1_OR_NULL,
    "data.batch_size": INT_GE1,
    "data.val_batch_size": INT_GE1,
    "data.num_workers": INT_GE0,
    "data.main_repeat": INT_GE1,
    # model
    "model.encoding": ("choice", ENCODINGS, "normalized, onehot or embedding"),
    "model.units": INT_GE1,
    "model.layers": INT_GE1,
    "model.embed_dim": INT_GE1,
    "model.dropout": DROPOUT,
    "model.input_dropout": DROPOUT,
    "model.output_dropout": ("float?", lambda v: 0 <= v < 1, "null or a number with 0 <= value < 1"),
    "model.optimizer": ("choice", ("adam", "adamw"), "adam or adamw"),
    "model.lr": ("float", lambda v: v > 0, "a number > 0"),
    "model.weight_decay": ("float", lambda v: v >= 0, "a number >= 0"),
    "model.scheduler": ("choice", ("none", "plateau", "cosine"), "none, plateau or cosine"),
    "model.warmup_steps": INT_GE0,
    "model.warmup_fraction": ("float", lambda v: 0 <= v < 1, "a number with 0 <= value < 1"),
    "model.min_lr_ratio": ("float", lambda v: 0 <= v <= 1, "a number with 0 <= value <= 1"),
    "model.plateau_factor": FRACTION_OPEN,
    "model.plateau_patience": INT_GE0,
    # trainer
    "trainer.accelerator": ("choice", ("cpu", "gpu", "cuda", "mps", "auto"), "cpu, gpu, cuda, mps or auto"),
    "trainer.strategy": ("choice", STRATEGIES, ", ".join(STRATEGIES)),
    "trainer.devices": ("any", _devices, "auto, -1 (all), an integer >= 1 or a list of device indices"),
    "trainer.num_nodes": INT_GE1,
    "trainer.precision": ("choice", PRECISIONS, "32-true, 16-mixed, bf16-mixed, 16-true, bf16-true or 64-true"),
    "trainer.min_epochs": ("int?", lambda v: v >= 0, "null or an integer >= 0"),
    "trainer.max_epochs": ("int?", lambda v: v >= 1 or v == -1, "an integer >= 1 (or -1 for no limit)"),
    "trainer.max_steps": ("int?", lambda v: v >= 1 or v == -1, "an integer >= 1 (or -1 for no limit)"),
    "trainer.max_time": (
        "str?",
        lambda v: _DURATION.match(v) is not None,
        'null or a duration "DD:HH:MM:SS", e.g. "00:02:00:00"',
    ),
    "trainer.gradient_clip_val": ("float?", lambda v: v >= 0, "null or a number >= 0"),
    "trainer.gradient_clip_algorithm": ("choice?", ("norm", "value"), "null, norm or value"),
    "trainer.accumulate_grad_batches": INT_GE1,
    "trainer.check_val_every_n_epoch": INT_GE1_OR_NULL,
    "trainer.val_check_interval": (
        "any",
        lambda v: v is None or (is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
        "null, a number of batches >= 1 or a fraction of the epoch in (0, 1]",
    ),
    "trainer.log_every_n_steps": INT_GE1,
    "trainer.num_sanity_val_steps": ("int", lambda v: v >= -1, "an integer >= 0 (or -1 for all)"),
    "trainer.limit_train_batches": BATCHES,
    "trainer.limit_val_batches": BATCHES,
    "trainer.overfit_batches": ("any", _batches_limit, "a count >= 0 or a fraction in [0, 1]"),
    "trainer.deterministic": ("any", lambda v: v in (True, False, "warn"), "true, false or warn"),
    "trainer.enable_checkpointing": ("bool", None, "true or false"),
    "trainer.enable_model_summary": ("bool", None, "true or false"),
    "trainer.enable_progress_bar": ("bool", None, "true or false"),
    # callbacks
    "callbacks.last_checkpoint.every_n_train_steps": INT_GE1_OR_NULL,
    "callbacks.last_checkpoint.train_time_interval": ("float?", lambda v: v > 0, "null or a number of seconds > 0"),
    "callbacks.last_checkpoint.handle_signals": ("bool", None, "true or false"),
    "callbacks.model_checkpoint.save_top_k": ("int", lambda v: v >= -1, "an integer >= 0 (or -1 to keep all)"),
    "callbacks.model_checkpoint.mode": ("choice", ("min", "max"), "min or max"),
    "callbacks.early_stopping.patience": INT_GE0,
    "callbacks.early_stopping.min_delta": ("float", lambda v: v >= 0, "a number >= 0"),
    "callbacks.early_stopping.mode": ("choice", ("min", "max"), "min or max"),
    # the run
    "seed": ("int?", lambda v: v >= 0, "null or an integer >= 0"),
    "ckpt_path": ("str?", lambda v: v.strip() != "", "null, last or a path to a .ckpt file"),
    "init_from": ("str?", lambda v: v.strip() != "", "null, base, last or a path to a .ckpt file"),
    "sample.prompt": ("str", None, "a string"),
    "sample.length": SAMPLING_RULES["length"],
    "sample.temperature": SAMPLING_RULES["temperature"],
}


def _get(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        try:
            node = node[part]
        except OmegaConfBaseException as err:
            msg = " ".join(str(err).split("\n")[0].split())
            raise ConfigError(f"{key} cannot be read: {msg}") from None
    return True, node


def check(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    """Raise ConfigError for the first value that breaks its rule; keys absent from ``cfg`` are skipped."""
    for key, rule in rules.items():
        present, value = _get(cfg, key)
        if present:
            refuse(key, value, rule)


def _missing(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys left as ``???``, found without resolving interpolations (which may need a Hydra run)."""
    found = []
    for key in node:
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
            continue
        if OmegaConf.is_interpolation(node, key):
            continue
        child = node.get(key)
        if isinstance(child, DictConfig):
            found.extend(_missing(child, f"{prefix}{key}."))
    return found


def check_missing(cfg: DictConfig) -> None:
    """Values left as ``???`` must be given on the command line."""
    missing = _missing(cfg)
    if missing:
        raise ConfigError(f"{missing[0]} must be set: add {missing[0]}=VALUE to the command")


_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def _settings_of(target: str) -> tuple[list[str], bool] | None:
    """The keyword arguments ``target`` accepts, and whether it takes ``**kwargs``; None if not importable."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        sig = inspect.signature(obj)
    except Exception:  # any import failure is reported as such
        return None
    names = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def check_known_keys(cfg: DictConfig, sections: tuple[str, ...] = ("data", "model", "trainer")) -> None:
    """Every key of an instantiated node is a setting of its class (a typo in a recipe file is caught here;
    typos on the command line Hydra already refuses)."""
    nodes: list[tuple[str, DictConfig]] = [(s, cfg[s]) for s in sections if isinstance(cfg.get(s), DictConfig)]
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig):
                nodes.append((f"{group}.{name}", node))
    for prefix, node in nodes:
        if "_target_" not in node:
            continue
        found = _settings_of(str(node._target_))
        if found is None:
            raise ConfigError(f"{prefix}._target_={node._target_!r} cannot be imported; check the class path")
        names, takes_kwargs = found
        if takes_kwargs:
            continue
        for key in node:
            if key not in _HYDRA_KEYS and key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {prefix}.{close[0]}?" if close else f"settings: {', '.join(names)}"
                raise ConfigError(f"{prefix}.{key} is not a setting of {node._target_}; {hint}")


# The top-level keys of configs/train.yaml and its groups (hparams_search adds optuna); any other comes from a typo in
# a config file, e.g. `modle:` in a recipe (a typo on the command line Hydra refuses itself)
TOP_LEVEL_KEYS = ("task_name", "seed", "ckpt_path", "init_from", "optimized_metric", "sample", "data", "model",
                  "trainer", "callbacks", "logger", "paths", "optuna")  # fmt: skip


def check_top_level(cfg: DictConfig, overrides: list[str]) -> None:
    """Every top-level key is one of :data:`TOP_LEVEL_KEYS` or added on the command line on purpose (``+key=...``)."""
    added = {o.split("=", 1)[0].lstrip("+").split(".")[0] for o in overrides if o.startswith("+")}
    for key in cfg:
        if key in TOP_LEVEL_KEYS or key in added:
            continue
        close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"settings there: {', '.join(TOP_LEVEL_KEYS)}"
        raise ConfigError(f"{key} is not a setting: {hint} ({_file_setting(str(key))}; to add a new key on purpose: "
                          f"+{key}=VALUE)")  # fmt: skip


def _file_setting(key: str) -> str:
    """Which chosen config file sets the top-level ``key`` (a recipe, a debug preset ...), as far as can be told."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        sources = [Path(s.path) for s in hydra_cfg.runtime.config_sources if s.schema == "file"]
        for group, choice in hydra_cfg.runtime.choices.items():
            if choice is None or group.startswith("hydra"):
                continue
            for source in sources:
                path = source / group / f"{choice}.yaml"
                try:  # only a file of the global package (a recipe, a preset) sets top-level keys
                    if path.is_file() and "@package _global_" in path.read_text() and key in OmegaConf.load(path):
                        return f"set in {path}"
                except (OSError, OmegaConfBaseException):
                    continue
    return "set in a config file"


def check_consistent(cfg: DictConfig) -> None:
    """Rules across keys."""
    present, data_enc = _get(cfg, "data.encoding")
    has_model, model_enc = _get(cfg, "model.encoding")
    if present and has_model and data_enc != model_enc:
        raise ConfigError(
            f"data.encoding={data_enc!r} differs from model.encoding={model_enc!r}; set model.encoding only "
            "(data.encoding follows it)"
        )
    _, val = _get(cfg, "data.val_fraction")
    _, test = _get(cfg, "data.test_fraction")
    if is_number(val) and is_number(test) and val + test >= 1:
        raise ConfigError(
            f"data.val_fraction={val} and data.test_fraction={test} leave no training text; keep their sum below 1"
        )
    _, lo = _get(cfg, "trainer.min_epochs")
    _, hi = _get(cfg, "trainer.max_epochs")
    if lo is not None and hi is not None and hi != -1 and lo > hi:
        raise ConfigError(f"trainer.min_epochs={lo} is more than trainer.max_epochs={hi}; lower min_epochs")


def validate_train(cfg: DictConfig) -> None:
    """Everything ``train()`` reads, checked before any work starts."""
    check_missing(cfg)
    check(cfg, TRAIN_RULES)
    check_consistent(cfg)
    check_known_keys(cfg)
