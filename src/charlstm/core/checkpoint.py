"""Safe checkpoint loading (``weights_only=True``), the network a checkpoint holds, and the newest ``last.ckpt``.

Nothing in a checkpoint file is ever run: ``torch.load(weights_only=True)`` only rebuilds tensors and plain
containers, and anything else (a pickle that names a function, a file that is not a checkpoint) is refused
with one line.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from charlstm.core.errors import CheckpointError
from charlstm.core.net import ENCODINGS, CharLSTM

REQUIRED_HPARAMS = ("vocab", "encoding", "units", "layers", "seq_len")
NET_PREFIX = "net."


def find_last(outputs_root: str | os.PathLike[str] = "outputs") -> Path:
    """The most recently written ``last.ckpt`` under ``outputs_root`` (runs and sweep jobs alike)."""
    root = Path(outputs_root)
    found = [p for p in root.rglob("last.ckpt") if p.is_file()] if root.is_dir() else []
    if not found:
        raise CheckpointError(f"no last.ckpt under {root}/; train a model first (make train) or pass ckpt=PATH")
    return max(found, key=lambda p: p.stat().st_mtime)


def resolve(ckpt: str | os.PathLike[str], outputs_root: str | os.PathLike[str] = "outputs") -> Path:
    """``last`` -> the newest last.ckpt; otherwise the path itself, which must exist."""
    if str(ckpt) == "last":
        return find_last(outputs_root)
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass ckpt=PATH to a .ckpt file or ckpt=last")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the .ckpt file inside it")
    return path


def _first_sentence(err: BaseException, limit: int = 140) -> str:
    text = " ".join(str(err).split())
    text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else type(err).__name__
    return text[:limit]


def _is_zip(path: Path) -> bool:
    """torch.save writes a zip archive: a file that starts like one is a damaged checkpoint, not a foreign file."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    """One line for a file torch.load could not read (nothing in it was run)."""
    code = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if code:
        return CheckpointError(
            f"checkpoint {path} was refused: loading it would call {code.group(1)}, and a safe load runs "
            "nothing; load only checkpoints written by charlstm"
        )
    if isinstance(err, EOFError) or path.stat().st_size == 0:
        return CheckpointError(f"checkpoint {path} is empty or truncated; use another checkpoint")
    if _is_zip(path):
        detail = _first_sentence(err) if isinstance(err, RuntimeError | OSError) else type(err).__name__
        return CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({detail}); use another checkpoint, "
            "e.g. the best-*.ckpt beside it"
        )
    detail = re.search(r"Unsupported (?:operand|class|global)[^\n]*", str(err))
    return CheckpointError(
        f"{path} is not a charlstm checkpoint: a safe load cannot read it "
        f"({detail.group(0).strip() if detail else type(err).__name__}); pass a .ckpt file written by charlstm"
    )


def nonfinite_tensor(state_dict: Mapping[str, Any]) -> str | None:
    """The name of the first tensor holding NaN, or +-inf in a tensor of one or more dimensions.

    Weights are never 0-dim, so a 0-dim buffer may hold inf on purpose (a "best so far" that starts at inf).
    """
    for name, value in state_dict.items():
        if not torch.is_tensor(value) or not value.is_floating_point() or value.numel() == 0:
            continue
        if torch.isnan(value).any() or (value.dim() > 0 and torch.isinf(value).any()):
            return name
    return None


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a charlstm checkpoint without unpickling arbitrary objects; refuse anything else in one line, and
    weights that are NaN or inf (nothing can be scored, sampled or trained from them)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # torch warns about unusual pickle protocols before refusing them; the refusal is the message
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; pass ckpt=PATH or ckpt=last") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory; pass the .ckpt file inside it") from None
    except PermissionError:
        raise CheckpointError(f"checkpoint {path} cannot be read (permission denied); check its permissions") from None
    except Exception as err:  # the safe unpickler runs nothing, so any failure means a damaged or foreign file
        raise _unreadable(path, err) from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "state_dict" not in ckpt or any(k not in hp for k in REQUIRED_HPARAMS):
        raise CheckpointError(f"{path} is not a charlstm checkpoint (no vocabulary or model sizes in it)")
    bad = nonfinite_tensor(ckpt["state_dict"]) if isinstance(ckpt["state_dict"], Mapping) else None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} has non-finite weights ({bad} holds NaN or inf): the training that wrote it had "
            "diverged; use an earlier checkpoint, e.g. the best-*.ckpt beside it"
        )
    return ckpt


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_hparams(hp: dict[str, Any], path: Path | str) -> None:
    """The hyperparameters a network is built from must be what charlstm writes, or the file is foreign."""
    vocab = hp["vocab"]
    problems = []
    if not isinstance(vocab, list | tuple) or not vocab or any(not isinstance(c, str) or len(c) != 1 for c in vocab):
        problems.append("its vocabulary is not a list of single characters")
    elif len(set(vocab)) != len(vocab):
        problems.append("its vocabulary lists a character twice")
    if hp["encoding"] not in ENCODINGS:
        problems.append(f"encoding={hp['encoding']!r} is unknown")
    for key in ("units", "layers", "seq_len", "embed_dim"):
        if key in hp and not _positive_int(hp[key]):
            problems.append(f"{key}={hp[key]!r} is not a positive integer")
    if problems:
        raise CheckpointError(f"{path} is not a usable charlstm checkpoint: {'; '.join(problems)}")


def build_net(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> CharLSTM:
    """The trained CharLSTM a loaded checkpoint holds, in eval mode; the file alone is enough.

    Dropout is built as 0: it does nothing at inference, and a foreign value cannot break the build.
    """
    hp = ckpt["hyper_parameters"]
    _check_hparams(hp, path)
    state = {k[len(NET_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(NET_PREFIX)}
    net = CharLSTM(len(hp["vocab"]), hp["units"], hp["layers"], 0.0, hp["encoding"], hp.get("embed_dim", 64))
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}: its weights do not fit the model its hyperparameters describe ({_first_sentence(err, 120)}); "
            "the file is damaged or was edited"
        ) from None
    return net.eval()
