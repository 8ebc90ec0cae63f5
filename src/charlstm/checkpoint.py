"""Safe checkpoint loading (``weights_only=True``) and finding the newest run's ``last.ckpt``."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from charlstm.errors import CheckpointError

REQUIRED_HPARAMS = ("vocab", "encoding", "units", "layers", "seq_len")


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


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a charlstm checkpoint without unpickling arbitrary objects; refuse anything else in one line."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; pass ckpt=PATH or ckpt=last") from None
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling refused"
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects a safe load will not run ({first[:160]}); "
            "only load checkpoints written by charlstm"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}); use another checkpoint, "
            "e.g. the best-*.ckpt beside it"
        ) from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "state_dict" not in ckpt or any(k not in hp for k in REQUIRED_HPARAMS):
        raise CheckpointError(f"{path} is not a charlstm checkpoint (no vocabulary or model sizes in it)")
    return ckpt
