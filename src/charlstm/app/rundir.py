"""Run and sweep-job folders: claimed atomically (a ``-N`` suffix when the name is taken), job folders named by
their overrides in safe characters, and the one folder every DDP rank of a run agrees on.

Hydra resolves ``hydra.run.dir`` and ``hydra.sweep.dir`` through the ``charlstm.unique_dir`` resolver and
``hydra.sweep.subdir`` through ``charlstm.job_dir`` (configs/hydra/default.yaml). The folder a process claims is
kept in ``os.environ``: resolving the same setting again in that process (Lightning reads ``hydra.run.dir`` to
start the DDP ranks, Hydra re-reads the sweep folder for every job) gives the same folder, and processes started
from it inherit the choice. A cluster launcher claims each job's folder when it submits the job and sends the claim
with it (:func:`hand_off`, :func:`adopt`): every task of the job, and every start of it after a requeue, uses that
folder. A command that fails takes away the folders it claimed and left unused (:func:`discard_unused`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from charlstm.core.errors import ConfigError, process_rank, write_failure

# {key: {"base": the name asked for, "dir": the folder claimed, "pid": the process that claimed it}}
DIRS_ENV = "CHARLSTM_RUN_DIRS"
# JSON list of the keys a multirun's command line fixes (not swept): left out of job folder names
FIXED_ENV = "CHARLSTM_SWEEP_FIXED"
# Longest override part of a job folder name; longer ones are cut and end in a short hash of the whole
NAME_LIMIT = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]+")
# The lock a running sweep holds on its sweep folder (charlstm.app.sweepdir)
SWEEP_LOCK = ".sweep.lock"
# What a folder may hold and still count as unused: Hydra's copy of the config, a sweep's multirun.yaml and lock,
# the log, a run's lock
BOOKKEEPING = (".hydra", "multirun.yaml", SWEEP_LOCK, "train.log", ".lock")
# The folders claim_dir made in this process, each with the parents it made for it (innermost first)
_made: dict[Path, list[Path]] = {}


def claim_dir(base: str | os.PathLike[str]) -> Path:
    """Create ``base``, or ``base-1``, ``base-2``, ... when it exists, and return the folder created.

    ``os.mkdir`` either creates the folder or fails, so two processes claiming the same name at the same moment
    never share it. The folder and the parents made for it are noted, so a command that fails before it used
    them takes them away again (:func:`discard_unused`).
    """
    base = Path(base)
    missing = [p for p in (base.parent, *base.parent.parents) if not p.exists()]
    n = 0
    while True:
        folder = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            if n == 0:
                base.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(folder)
        except FileExistsError:
            n += 1
            continue
        except OSError as err:
            if write_failure(err) is None:
                raise
            # A read-only or full disk: the name as it is, so the folder fails where it is made (Hydra's mkdir),
            # in one line, rather than inside every Hydra callback that reads it (a warning each).
            return base
        _made[folder] = missing
        return folder


def is_unused(folder: Path) -> bool:
    """True when ``folder`` holds nothing a run made: only Hydra's copies of the config and the log, if that."""
    try:
        return all(p.name in BOOKKEEPING for p in folder.iterdir())
    except OSError:
        return False


def discard_unused(*folders: Path) -> None:
    """Remove the folders this process claimed (all, or ``folders``) that are still unused, and the parents made
    for them that this leaves empty: a command refused before its first job leaves no folder behind."""
    for folder in [f for f in reversed(_made) if not folders or f in folders]:
        if not is_unused(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        for parent in _made.pop(folder):  # innermost first
            try:
                parent.rmdir()  # only when empty: another run may have made its folder there meanwhile
            except OSError:
                break


def safe_name(text: str, limit: int = NAME_LIMIT) -> str:
    """``text`` as a file name: ASCII letters, digits and ``. _ = , + @ -``; accents dropped (é -> e), anything
    else (slashes, spaces, quotes, other scripts) one ``_``; over ``limit`` chars, cut and ended with ``-`` and 8
    hex digits of a hash of the whole text, so distinct long names stay distinct."""
    # accents fall off their letter (é -> e); a char with no ASCII form becomes "_", never nothing
    folded = "".join(
        c if c.isascii() else "_" for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)
    )
    name = re.sub(r"_{2,}", "_", _UNSAFE.sub("_", folded)).strip("._-") or "_"
    if len(name) > limit:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        name = f"{name[: limit - 9].rstrip('._-')}-{digest}"
    return name


def override_key(override: str) -> str:
    """``model.units`` of ``model.units=64`` (also of ``+model.units=64`` and ``~model.units``)."""
    return override.split("=", 1)[0].lstrip("+~")


def fixed_keys(command_overrides: Iterable[str]) -> list[str]:
    """The keys a multirun command line sets to one value (every other key a job has is swept)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    swept: dict[str, bool] = {}
    for text in command_overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # Hydra reports it itself
            continue
        key = override_key(override.get_key_element())
        swept.pop(key, None)  # the last override of a key is the one that counts
        swept[key] = override.is_sweep_override()
    return [key for key, is_swept in swept.items() if not is_swept]


def swept_overrides(overrides: Sequence[str], fixed: Iterable[str] | None = None) -> list[str]:
    """A sweep job's own overrides: those of the swept keys, sorted by key. ``fixed`` defaults to the keys the
    running multirun's command line fixes; without one, every override but ``paths.*`` counts."""
    if fixed is None:
        fixed = json.loads(os.environ.get(FIXED_ENV, "null"))
    known = fixed is not None
    fixed = set(fixed or ())

    def is_fixed(key: str) -> bool:
        # only the key itself: a group chosen on the command line (data=file) leaves its keys (data.seq_len) swept
        return key in fixed if known else key == "paths" or key.startswith("paths.")

    return sorted((o for o in overrides if not is_fixed(override_key(o))), key=override_key)


def short_keys(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with each key cut to its last part (``model.weight_decay=0.01`` -> ``weight_decay=0.01``), or to
    as many last parts as keep it apart from the other keys (``data.x=1`` and ``model.x=2`` stay whole)."""
    keys = [override_key(o) for o in overrides]

    def tail(key: str, n: int) -> str:
        return ".".join(key.split(".")[-n:])

    short = []
    for override, key in zip(overrides, keys, strict=True):
        n = 1
        while n < key.count(".") + 1 and sum(tail(k, n) == tail(key, n) for k in keys) > 1:
            n += 1
        prefix, _, value = override.partition(key)
        short.append(f"{prefix}{tail(key, n)}{value}")
    return short


def job_dirname(num: int | str, overrides: Sequence[str]) -> str:
    """``0_data.seq_len=50,model.units=64``: the job number, then its swept overrides made safe; ``0`` alone when
    nothing is swept. Overrides longer than :data:`NAME_LIMIT` together name their keys by the last part only
    (``3_batch_size=64,...,units=512,weight_decay=0.0034``: a search's seven values all stay in the name)."""
    if not overrides:
        return str(num)
    text = ",".join(overrides)
    if len(text) > NAME_LIMIT:
        text = ",".join(short_keys(overrides))
    return f"{num}_{safe_name(text)}"


# -- the claims of this command ---------------------------------------------------------------------------------
def _claims() -> dict[str, dict[str, Any]]:
    try:
        claims = json.loads(os.environ.get(DIRS_ENV, ""))
    except ValueError:
        return {}
    return {k: v for k, v in claims.items() if isinstance(v, dict)} if isinstance(claims, dict) else {}


def claimed(key: str, base: str) -> str:
    """The folder this command uses for ``key`` (``run``, ``sweep``, ``job:<sweep>:<num>``), created on first use.

    Rank 0 (or a process alone) claims it; asking again gets the same folder. A process started from it (a DDP
    rank, a launcher's worker) inherits the claims: it takes the same folder for the same ``base``, and a rank > 0
    takes rank 0's whatever its own ``base`` (its clock may have passed the second), else ``base`` as it is, never
    a suffixed folder of its own.
    """
    claims = _claims()
    entry = claims.get(key)
    rank = process_rank()
    if entry is not None and (entry.get("pid") == os.getpid() or entry.get("base") == base or rank > 0):
        return str(entry["dir"])
    if rank > 0:
        Path(base).mkdir(parents=True, exist_ok=True)
        return base
    folder = str(claim_dir(base))
    claims[key] = {"base": base, "dir": folder, "pid": os.getpid()}
    os.environ[DIRS_ENV] = json.dumps(claims)
    return folder


def release(*keys: str) -> None:
    """Forget this process's claims (all, or ``keys``), so a next run in the same process claims afresh."""
    claims = _claims()
    for key in keys or list(claims):
        if key in claims and claims[key].get("pid") == os.getpid():
            _made.pop(Path(claims[key]["dir"]), None)
            del claims[key]
    os.environ[DIRS_ENV] = json.dumps(claims)


def job_key(sweep_dir: str, num: Any) -> str:
    return f"job:{sweep_dir}:{num}"


def claim_job_dir(sweep_dir: str, num: Any, overrides: Sequence[str]) -> str:
    """The folder of job ``num`` of the sweep in ``sweep_dir`` (whose overrides are ``overrides``), claimed once."""
    return claimed(job_key(sweep_dir, num), str(Path(sweep_dir) / job_dirname(num, swept_overrides(overrides))))


def hand_off(key: str) -> dict[str, Any]:
    """This process's claim of ``key``, taken out of its environment, for the process that runs the job (a cluster
    job, started again when it is requeued): given to :func:`adopt` there, it names the same folder every time."""
    claims = _claims()
    entry = claims.pop(key)
    os.environ[DIRS_ENV] = json.dumps(claims)
    return {key: entry}


def adopt(claims: dict[str, Any]) -> None:
    """Take ``claims`` (from :func:`hand_off`) as this process's own: resolving their folders gives those."""
    mine = _claims()
    mine.update({key: {**entry, "pid": os.getpid()} for key, entry in claims.items()})
    os.environ[DIRS_ENV] = json.dumps(mine)


# -- one process per run folder ---------------------------------------------------------------------------------
LOCK_FILE = ".lock"
RUN_FILES = ("config.yaml",)
# The run folder this process trains into, with the open lock file that holds it
_held: dict[Path, Any] = {}


def take_lock(path: Path, record: str) -> IO[str] | None:
    """An exclusive ``flock`` on the file ``path`` (made if missing), with ``record`` written in it; the open file,
    which holds the lock until it is closed or the process ends (the kernel drops it even after kill -9, so nothing
    stale is left), or None when another process holds it (its record stays readable in the file)."""
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 -- kept open: the lock lives with it
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        fh.close()
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(record)
    fh.flush()
    return fh


class RunFolderBusy(ConfigError):
    """Another process is training into the run folder."""


def hold(folder: str | os.PathLike[str], resuming: bool = False) -> None:
    """Take ``folder`` for this process: an exclusive ``flock`` on ``folder/.lock`` (with this pid written in it),
    held until the process ends or it takes another folder. The kernel drops the lock when the process dies, so a
    killed run leaves nothing stale. A folder another process holds is refused in one line naming that process.
    DDP ranks > 0 take nothing: rank 0 holds the folder for the whole run."""
    if process_rank() > 0:
        return
    folder = Path(folder).resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fh = take_lock(folder / LOCK_FILE, f"{os.getpid()}\n")
    if fh is None:
        pid = (folder / LOCK_FILE).read_text(encoding="utf-8").strip() or "unknown"
        fix = "wait for it to end or stop it, then resume" if resuming else "choose another hydra.run.dir"
        raise RunFolderBusy(f"run folder {folder} is in use: process {pid} is training into it; {fix}")
    let_go()  # one folder at a time: a process that trains again (a test, a sweep's next job) gives the last one back
    _held[folder] = fh


def holds(folder: str | os.PathLike[str]) -> bool:
    """Whether this process holds ``folder`` (:func:`hold`)."""
    return Path(folder).resolve() in _held


def let_go() -> None:
    """Give back the folder this process holds (closing the lock file drops the lock)."""
    while _held:
        _held.popitem()[1].close()


def load_run_config(run_dir: Path, otherwise: str = "start a new run") -> DictConfig:
    """A run's ``config.yaml`` (its settings, which a resume and eval.py read); one line naming the file when it is
    unreadable, not YAML, empty, or not a run's settings (the run writes it atomically, so only a hand edit or a
    damaged disk gets here)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        saved = OmegaConf.load(path)
        settings = isinstance(saved, DictConfig) and {"data", "model", "trainer"} <= set(saved)
        why = None if settings else "not a run's settings"
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        why = f"invalid YAML at line {mark.line + 1}" if mark is not None else "invalid YAML"
    except OSError as err:
        why = err.strerror or type(err).__name__
    if why is not None:
        empty = path.is_file() and not path.read_bytes().strip()
        raise ConfigError(
            f"{path} cannot be read ({'empty' if empty else why}): it holds the run's settings; restore it from the "
            f"run's .hydra/config.yaml or config-resume-N.yaml, or {otherwise}"
        )
    return saved


def holds_a_run(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a run's folder (its settings, ``config.yaml``, are there)."""
    return all((Path(folder) / f).is_file() for f in RUN_FILES)


def run_folder_of(ckpt_path: str | os.PathLike[str]) -> Path | None:
    """The run folder a checkpoint belongs to (``RUN/checkpoints/x.ckpt`` beside ``RUN/config.yaml``), if any."""
    ckpt_path = Path(ckpt_path)
    run = ckpt_path.parent.parent
    if ckpt_path.parent.name == "checkpoints" and holds_a_run(run):
        return run
    return None


def absolute(path: Any) -> Path:
    """``path`` from the working folder, made absolute (``..`` resolved, symbolic links kept)."""
    return Path(os.path.abspath(Path(str(path)).expanduser()))


def check_moved_corpus(data: Any, new_path: str, run_dir: Path) -> None:
    """A new ``data.path`` for a run's own text (a resume, or its own validation text in eval.py) is the run's
    corpus file moved: accepted when the file holds the very bytes the run trained on (the sha256 its config.yaml
    recorded, ``data.sha256``), refused in one line otherwise."""
    expected = data.get("sha256")
    if not Path(new_path).expanduser().is_file():
        raise ConfigError(f"data.path={new_path} is not a file; point it at the run's corpus file where it is now")
    if expected is None:
        raise ConfigError(
            f"data.path={new_path}: the run in {run_dir} recorded no sha256 of its corpus, so a moved file cannot be "
            f"checked; put its corpus back at {data.get('path')}"
        )
    from charlstm.data.prepared import file_hash  # SHA-256 of the bytes, as the run recorded

    if file_hash(Path(new_path).expanduser()) != str(expected).lower():
        raise ConfigError(
            f"data.path={new_path} is not the text the run in {run_dir} trained on (its corpus was {data.get('path')}, "
            f"sha256 {str(expected)[:12]}...); point data.path at that text"
        )


def resumed_folder(ckpt_path: Any, outputs_root: Any) -> Path | None:
    """The run folder ``ckpt_path`` (a path or ``last``) continues, or None (a new run, or a loose checkpoint)."""
    if not ckpt_path:
        return None
    if str(ckpt_path) == "last":
        from charlstm.core.checkpoint import find_last
        from charlstm.core.errors import CheckpointError

        try:
            path = find_last(outputs_root)
        except CheckpointError:  # train() says it in one line
            return None
    else:
        path = Path(str(ckpt_path)).expanduser()
    return run_folder_of(path.resolve()) if path.is_file() else None


def _run_dir(ckpt_path: Any, outputs_root: Any, base: str) -> str:
    """A resume writes into the folder of the run it continues (its train.log, result.json and curves go on
    there); any other run claims a new folder."""
    folder = resumed_folder(ckpt_path, outputs_root)
    return str(folder) if folder is not None else claimed("run", str(base))


def _hydra_subdir(output_dir: str) -> str | None:
    """Where Hydra saves this command's composed config: ``.hydra``, except in a folder that already holds a run
    (a resume), whose own ``.hydra`` is kept as the run's first command made it."""
    return None if holds_a_run(output_dir) else ".hydra"


def _unique_dir(base: str, kind: str = "run") -> str:
    return claimed(kind, str(base))


def _job_dir(sweep_dir: str, num: Any, *, _root_: DictConfig) -> str:
    overrides = list(OmegaConf.select(_root_, "hydra.overrides.task", default=[]) or [])
    return Path(claim_job_dir(sweep_dir, num, overrides)).name


def register_resolvers() -> None:
    """``${charlstm.unique_dir:BASE[,sweep]}``, ``${charlstm.job_dir:SWEEP_DIR,NUM}``,
    ``${charlstm.run_dir:CKPT_PATH,OUTPUTS_ROOT,BASE}`` and ``${charlstm.hydra_subdir:OUTPUT_DIR}`` (configs/hydra)."""
    if not OmegaConf.has_resolver("charlstm.unique_dir"):
        OmegaConf.register_new_resolver("charlstm.unique_dir", _unique_dir)
    if not OmegaConf.has_resolver("charlstm.job_dir"):
        OmegaConf.register_new_resolver("charlstm.job_dir", _job_dir)
    if not OmegaConf.has_resolver("charlstm.run_dir"):
        OmegaConf.register_new_resolver("charlstm.run_dir", _run_dir)
    if not OmegaConf.has_resolver("charlstm.hydra_subdir"):
        OmegaConf.register_new_resolver("charlstm.hydra_subdir", _hydra_subdir)


def _discard_all_but(used: str) -> None:
    """Remove the folders claimed while the config was composed that the command does not use: merging a config
    over a default folder (``hparams_search=lstm`` sets its own sweep folder) resolves the default one too."""
    others = [f for f in _made if f.resolve() != Path(used).resolve()]
    if others:
        discard_unused(*others)


class RunDirs(Callback):
    """Hydra callback: notes which keys a multirun fixes (job folders name only the swept ones) and forgets the
    folders claimed once a run or multirun ends."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _discard_all_but(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        os.environ[FIXED_ENV] = json.dumps(fixed_keys([str(o) for o in task or []]))
        _discard_all_but(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(FIXED_ENV, None)
        release()

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release()


# Registered on import: Hydra imports this module to build the callback above, also in a launcher's worker process
# (submitit), before any folder is resolved there.
register_resolvers()


def command_line_keys() -> list[str]:
    """The config keys this Hydra job's command line sets, a sweep job's swept keys only; empty outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []
    return [override_key(o) for o in swept_overrides(overrides)]
