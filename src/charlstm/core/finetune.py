"""``init_from``: a new run that starts from a trained checkpoint's weights (the shipped Shakespeare base model, or any
charlstm checkpoint), with its own optimizer and schedule; unlike ``ckpt_path``, which resumes a run.

The run's vocabulary is the checkpoint's plus the chars of the new text it lacks (sorted, like any vocabulary). Rows
are matched by char: a char both know keeps its trained embedding row and head row; a new char gets the mean of the
trained embedding rows (an input that looks like an average char) and the mean head row with the smallest trained
bias (a char the model rates as unlikely as its rarest one until the text teaches it otherwise). Chars the new text
lacks stay in the vocabulary: training on the new text pushes their probability down, but generation still samples
from every char, so they may appear, rarely.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from charlstm.core import checkpoint, fileio
from charlstm.core.errors import CheckpointError, ConfigError
from charlstm.core.net import CharLSTM

BASE = "base"
# The shipped base model: a run folder (config.yaml beside checkpoints/), so `eval.py ckpt=...` scores it on its own
# validation text like any run's checkpoint.
BASE_RUN = ("pretrained", "base")
BASE_FILE = "base.ckpt"
SHAPE_KEYS = ("encoding", "units", "layers")


def base_path() -> Path:
    """The shipped base checkpoint, inside the installed package."""
    return Path(str(files("charlstm").joinpath(*BASE_RUN, "checkpoints", BASE_FILE)))


def resolve(value: str | os.PathLike[str], outputs_root: str | os.PathLike[str] = "outputs") -> Path:
    """``base`` -> the shipped base model; otherwise a checkpoint path (or ``last``, the newest last.ckpt)."""
    if str(value) == BASE:
        path = base_path()
        if not path.is_file():
            raise CheckpointError(
                f"the base model {path} is missing from this installation; reinstall charlstm or pass init_from=PATH"
            )
        return path
    try:
        return checkpoint.resolve(value, outputs_root)
    except CheckpointError as err:
        raise CheckpointError(str(err).replace("ckpt=", "init_from=")) from None


def describe(value: str, path: Path) -> str:
    """What a checkpoint records as its origin: ``base`` or the absolute path it started from."""
    return BASE if str(value) == BASE else str(path.resolve())


def check_compatible(value: str, hp: dict[str, Any], model: Any, lowercase: bool) -> None:
    """The run's model must have the checkpoint's shape, and a case-preserving run cannot start from a lowercase
    model (it has never seen a capital: every one would be a new char learnt from nothing)."""
    keys = [*SHAPE_KEYS, "embed_dim"] if hp.get("encoding") == "embedding" else list(SHAPE_KEYS)
    for key in keys:
        theirs, mine = hp.get(key, 64 if key == "embed_dim" else None), model.get(key)
        if theirs != mine:
            raise ConfigError(
                f"init_from={value} has model.{key}={theirs} but this run has model.{key}={mine}; "
                f"set model.{key}={theirs} (the checkpoint's shape) or drop init_from"
            )
    if hp.get("lowercase", True) and not lowercase:
        raise ConfigError(
            f"init_from={value} was trained on lowercased text but this run keeps case (data.lowercase=false); "
            "set data.lowercase=true, or start from a case-preserving checkpoint (init_from=base)"
        )


def extended_vocab(old: list[str], text: list[str]) -> list[str]:
    """The checkpoint's chars and the text's, sorted: the checkpoint's are kept even where the text lacks them."""
    return sorted(set(old) | set(text))


def transfer(net: CharLSTM, state: dict[str, torch.Tensor], old: list[str], new: list[str], value: str) -> None:
    """Load ``state`` (a checkpoint's ``net.`` weights, numbered by ``old``) into ``net`` (numbered by ``new``, a
    superset): the shared chars' rows by char, new chars' rows initialised as the module docstring says."""
    position = {c: i for i, c in enumerate(old)}
    missing = [c for c in old if c not in set(new)]
    if missing:  # extended_vocab never drops one; a data.vocab given by hand might
        raise ConfigError(f"init_from={value}: data.vocab lacks {len(missing)} of its chars; set data.vocab=null")
    known = torch.tensor([i for i, c in enumerate(new) if c in position], dtype=torch.long)
    source = torch.tensor([position[c] for c in new if c in position], dtype=torch.long)
    fresh = torch.tensor([i for i, c in enumerate(new) if c not in position], dtype=torch.long)
    target = net.state_dict()
    loaded = {}
    for name, mine in target.items():
        if name not in state:
            raise CheckpointError(f"init_from={value} has no weights {name}; pass a checkpoint written by charlstm")
        theirs = state[name].to(mine.dtype)
        if name in ("embed.weight", "head.weight", "head.bias"):  # one row per char
            rows = torch.empty_like(mine)
            rows[known] = theirs[source]
            if len(fresh):
                rows[fresh] = theirs.min() if name == "head.bias" else theirs.mean(0)
            theirs = rows
        elif name == "lstm.weight_ih_l0" and net.encoding == "onehot":  # one column per char
            cols = torch.empty_like(mine)
            cols[:, known] = theirs[:, source]
            if len(fresh):
                cols[:, fresh] = theirs.mean(1, keepdim=True)
            theirs = cols
        if theirs.shape != mine.shape:
            raise ConfigError(
                f"init_from={value}: its {name} has shape {tuple(theirs.shape)} but this model's is "
                f"{tuple(mine.shape)}; use the checkpoint's model settings or drop init_from"
            )
        loaded[name] = theirs
    net.load_state_dict(loaded, strict=True)


def load(value: str, outputs_root: str | os.PathLike[str] = "outputs") -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``init_from`` names, loaded safely (``weights_only=True``) and checked to build a network."""
    path = resolve(value, outputs_root)
    ckpt = checkpoint.load(path)
    checkpoint.build_net(ckpt, path)  # refuses a file whose weights do not fit its own hyperparameters
    return path, ckpt


def net_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    prefix = checkpoint.NET_PREFIX
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def check_normalized(value: str, encoding: str, old: list[str], new: list[str]) -> None:
    """With ``normalized`` input a char's id is scaled by the vocabulary size: another vocabulary changes every
    input the model has learnt."""
    if encoding == "normalized" and old != new:
        raise ConfigError(
            f"init_from={value} reads normalized ids (id / vocabulary size) and this text changes its vocabulary "
            f"({len(old)} -> {len(new)} chars); fine-tune a text with the same chars, or start from an embedding model"
        )


def export(src: str | os.PathLike[str], dest: str | os.PathLike[str], half: bool = True) -> Path:
    """A checkpoint made small enough to ship: the hyperparameters and the network's weights (fp16 with ``half``),
    without optimizer state or training loops. It loads like any checkpoint (eval.py, generate.py, init_from)."""
    ckpt = checkpoint.load(src)
    state = {k: (v.half() if half and v.is_floating_point() else v).clone()
             for k, v in ckpt["state_dict"].items() if k.startswith(checkpoint.NET_PREFIX)}  # fmt: skip
    small = {"hyper_parameters": ckpt["hyper_parameters"], "state_dict": state,
             "epoch": ckpt.get("epoch", 0), "global_step": ckpt.get("global_step", 0),
             "pytorch-lightning_version": ckpt.get("pytorch-lightning_version")}  # fmt: skip
    dest = Path(dest)
    fileio.atomic_write(dest, lambda fh: torch.save(small, fh))  # a stopped export leaves the old file whole
    return dest
