"""Run and sweep-job folders: claimed atomically (a ``-N`` suffix when the name is taken), job folders named by
their overrides in safe characters, and one process at a time training in a run folder (an flock on RUN/.lock).

Hydra resolves ``hydra.run.dir`` through the ``charlstm.run_dir`` resolver, ``hydra.sweep.dir`` through
``charlstm.unique_dir`` and ``hydra.sweep.subdir`` through ``charlstm.job_dir`` (configs/hydra/default.yaml), each
resolved once per config (OmegaConf's resolver cache). Lightning starts DDP ranks with rank 0's folder as
``hydra.run.dir``; a cluster launcher claims each job's folder when it submits the job and sends it as the job's
``hydra.sweep.dir`` and ``hydra.sweep.subdir``, so every task of the job, and every start after a requeue, uses it.
A command that fails takes away the folders it claimed and left unused (:func:`discard_unused`).
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

# JSON list of the keys a multirun's command line fixes (not swept): left out of job folder names. An environment
# variable because a job reads it in another process (a submitit job, as it names its swept keys in result.json),
# and Hydra keeps no record of which overrides a multirun's command line swept.
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


def claim_job_dir(sweep_dir: str, num: Any, overrides: Sequence[str]) -> str:
    """Claim the folder of job ``num`` of the sweep in ``sweep_dir`` (whose overrides are ``overrides``)."""
    return str(claim_dir(Path(sweep_dir) / job_dirname(num, swept_overrides(overrides))))


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


def _claim(base: str) -> str:
    """``base`` claimed (:func:`claim_dir`); a DDP rank > 0 that resolves the folder itself (its ranks started by a
    scheduler, not by Lightning, which passes rank 0's ``hydra.run.dir`` on) takes ``base`` as it is, rank 0's."""
    if process_rank() > 0:
        Path(base).mkdir(parents=True, exist_ok=True)
        return base
    return str(claim_dir(base))


def _run_dir(ckpt_path: Any, outputs_root: Any, base: str) -> str:
    """A resume writes into the folder of the run it continues (its train.log, result.json and curves go on
    there); any other run claims a new folder."""
    folder = resumed_folder(ckpt_path, outputs_root)
    return str(folder) if folder is not None else _claim(str(base))


def _job_dir(sweep_dir: str, num: Any, overrides: Sequence[str]) -> str:
    return Path(claim_job_dir(str(sweep_dir), num, [str(o) for o in overrides or []])).name


def _hydra_subdir(output_dir: str) -> str | None:
    """Where Hydra saves this command's composed config: ``.hydra``, except in a folder that already holds a run
    (a resume), whose own ``.hydra`` is kept as the run's first command made it."""
    return None if holds_a_run(output_dir) else ".hydra"


def register_resolvers() -> None:
    """``${charlstm.unique_dir:BASE}``, ``${charlstm.job_dir:SWEEP_DIR,NUM,OVERRIDES}``,
    ``${charlstm.run_dir:CKPT_PATH,OUTPUTS_ROOT,BASE}`` and ``${charlstm.hydra_subdir:OUTPUT_DIR}`` (configs/hydra).

    The folder resolvers keep what they return in the config's resolver cache (``use_cache``, as Hydra's own
    ``now``): reading the setting again gives the same folder, and Hydra copies the cache into every job's config
    of a multirun (``load_sweep_config``), so the jobs share the one sweep folder claimed."""
    for name, resolver, cached in (
        ("charlstm.unique_dir", _claim, True),
        ("charlstm.job_dir", _job_dir, True),
        ("charlstm.run_dir", _run_dir, True),
        ("charlstm.hydra_subdir", _hydra_subdir, False),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=cached)


def _discard_all_but(used: str, inside: bool = False) -> None:
    """Remove the folders claimed while a config was composed that the command does not use: merging a config over
    a default folder (``hparams_search=lstm`` sets its own sweep folder) resolves the default one too, and a sweep
    composes each job's config again. ``inside``: the folders within ``used`` (a sweep's jobs) are kept too."""
    used_dir = Path(used).resolve()
    others = [f for f in _made if f.resolve() != used_dir and not (inside and used_dir in f.resolve().parents)]
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
        _discard_all_but(config.hydra.sweep.dir, inside=True)
        _made.clear()

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        _made.clear()  # used: a later command in this process that fails leaves them alone


# Registered on import: Hydra imports this module to build the callback above, also in a launcher's worker process
# (submitit), before any folder is resolved there.
register_resolvers()
