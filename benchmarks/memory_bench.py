"""Peak memory and start-up time of training on a big text file: the first run (which prepares the corpus into
data/prepared/) and later runs (which memory-map it), for synthetic corpora of growing size.

    python benchmarks/memory_bench.py                       # 10 MB, 100 MB, 400 MB, 1 GB (4 GB: --sizes 4GB)
    python benchmarks/memory_bench.py --sizes 10MB,100MB --recipes charrnn,seed
    python benchmarks/memory_bench.py --sizes 4GB --recipes seed --src OLD,. --no-first --cgroup-mb 1024

Each run is `python train.py data=file data.path=BIG experiment=RECIPE trainer.max_steps=20` in a fresh process;
its peak resident memory is the kernel's (``wait4``: ru_maxrss, which counts pages of the memory-mapped id file
the run touched; under DDP, the largest rank's) and its anonymous and file-backed parts are sampled every 20 ms
from /proc (RssAnon and RssFile of /proc/PID/status; under DDP, summed over the ranks). Several source trees
(``--src A,B``) are measured interleaved on one prepared corpus. ``--cgroup-mb`` runs each training in a memory
cgroup with that limit (v1 or v2, where this user may create one): the kernel reclaims clean file pages there
before it kills anything, and a run it kills is marked "killed". Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from charlstm.core.hardware import cpu_capability  # noqa: E402

SIZES = {"10MB": 10_000_000, "100MB": 100_000_000, "400MB": 400_000_000, "1GB": 1_000_000_000, "4GB": 4_000_000_000}
# recipe name -> overrides; every run: 20 steps, a 2000-window validation, a short sample
RECIPES = {
    "charrnn": ["experiment=charrnn"],  # streams, embedding, 2 x 256
    "default": [],  # the default recipe: streams (on a file, the file alone)
    "seed": ["experiment=seed", "data.val_max_windows=2000"],  # windows, the tutorial's 2 x 300
    "seed-ddp": ["experiment=seed", "data.val_max_windows=2000", "trainer=ddp_cpu"],  # the same, 2 processes
}
COMMON = ["trainer.max_steps=20", "trainer.enable_progress_bar=false", "sample.length=100", "logger=csv",
          "callbacks.text_sample=null"]  # fmt: skip


def synthetic_text(path: Path, size: int, seed: int = 0) -> None:
    """``size`` bytes of UTF-8 text: lines of words over ~120 chars (ASCII, accented Latin, Greek, Cyrillic, CJK,
    typographic punctuation), a 16 MB block of varied lines repeated."""
    rnd = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    other = "éèêàçüöäßñøåæœ" + "αβγδεζηθλμπσςω" + "абвгдежзик" + "日本語中文字漢" + "—…«»“”€"
    punct = ".,;:!?'\"()-[]{}#$%&*+/<=>@_|~`"
    words = []
    for _ in range(20_000):
        pool = letters if rnd.random() < 0.93 else letters[:26] + other
        words.append("".join(rnd.choice(pool) for _ in range(rnd.randint(1, 10))))
    lines, length = [], 0
    while length < min(size, 16 << 20):
        line = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 14))) + rnd.choice(["", "", rnd.choice(punct)])
        lines.append(line)
        length += len(line.encode()) + 1
    block = ("\n".join(lines) + "\n").encode()
    with open(path, "wb") as fh:
        for _ in range(size // len(block)):
            fh.write(block)
        rest = block[: size % len(block)]
        cut = rest.rfind(b"\n") + 1  # end on a whole line (a char cut in two would be invalid UTF-8)
        fh.write(rest[:cut] + b"." * (len(rest) - cut))


def rss_kb(pid: int, field: str = "RssAnon") -> int:
    """Resident memory (KB) of one kind (``RssAnon``: the process's own; ``RssFile``: pages of mapped files, which
    the kernel may reclaim) of ``pid`` and every process it started (a DDP run's other ranks)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                total += int(line.split()[1])
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_kb(int(child), field)
    except OSError:
        pass
    return total


def memory_cgroup(limit_mb: int) -> Path | None:
    """A new memory cgroup limited to ``limit_mb`` MB (cgroup v2, else v1), or None where none can be made."""
    for root, limit in (
        (Path("/sys/fs/cgroup"), "memory.max"),
        (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
    ):
        group = root / f"charlstm-bench-{os.getpid()}"
        try:
            if not (root / limit).exists() and not (root / "cgroup.procs").exists():
                continue
            group.mkdir(exist_ok=True)
            (group / limit).write_text(str(limit_mb << 20))
            if limit == "memory.limit_in_bytes" and (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit_mb << 20))
            return group
        except OSError:
            with contextlib.suppress(OSError):
                group.rmdir()
    return None


def startup_seconds(train_log: Path, started: float) -> float | None:
    """Seconds from the process's start to its "training:" line (logged once the corpus is loaded and the
    trainer built, right before the first step)."""
    try:
        for line in train_log.read_text(encoding="utf-8").splitlines():
            if "] training: " in line:
                stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return round(stamp - started, 2)
    except (OSError, ValueError):
        pass
    return None


def cgroup_peak_mb(cgroup: Path | None) -> int | None:
    """The most memory the cgroup was charged since the last call (MB; v1 reset after reading), or None."""
    if cgroup is None:
        return None
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        with contextlib.suppress(OSError, ValueError):
            peak = int((cgroup / name).read_text()) >> 20
            if name == "memory.max_usage_in_bytes":
                (cgroup / name).write_text("0")
            return peak
    return None


def evict(folder: Path) -> None:
    """Drop the page cache of the prepared id files under ``folder``, so that a run in a cgroup faults them in
    itself and is charged for them (pages already cached stay charged to whoever read them first)."""
    for path in folder.glob("prepared/*/ids.*"):
        with open(path, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, cgroup: Path | None = None) -> dict:
    """Run ``cmd`` (in ``cgroup`` if given); wall seconds, peak RSS (MB, the kernel's) and peak anonymous and
    file-backed RSS (MB, sampled); ``killed`` when the kernel killed it (out of memory)."""
    started = time.time()
    start = time.monotonic()
    join = None if cgroup is None else lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=join)
        peak_anon = peak_file = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, rss_kb(proc.pid))
            peak_file = max(peak_file, rss_kb(proc.pid, "RssFile"))
            time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    killed = proc.returncode == -signal.SIGKILL
    charged = cgroup_peak_mb(cgroup)
    if proc.returncode != 0 and not killed:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return {"wall_s": round(wall, 2), "started": started, "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "peak_anon_mb": round(peak_anon / 1024), "peak_file_mb": round(peak_file / 1024),
            "killed": killed, "cgroup_peak_mb": charged}  # fmt: skip


CHECK = """
import sys, time
from charlstm.data.prepared import prepare
started = time.perf_counter()
prepare(sys.argv[1], sys.argv[2])
print(time.perf_counter() - started)
"""


def check_seconds(text: Path, data_dir: Path, env: dict[str, str]) -> float:
    """What a later run pays to trust the prepared cache: prepare() on it, in a process of its own. The text and the
    ids are not read when their files are as recorded (same inode, size, mtime and ctime); otherwise they are
    hashed, a full read of each."""
    done = subprocess.run([sys.executable, "-c", CHECK, str(text), str(data_dir)], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return round(float(done.stdout.split()[-1]), 3)


def summarize(results: list[dict]) -> list[dict]:
    """One row per (corpus, recipe, first/later): the best start-up and wall time (the least disturbed by other
    work on the machine) and the worst peak memory of its runs."""
    rows: dict[tuple[str, str, str, str], dict] = {}
    for r in results:
        key = (r["size"], r.get("tree", ""), r["recipe"], r["run"])
        row = rows.setdefault(key, {**r, "runs": 0})
        row["runs"] += 1
        for k, pick in (("startup_s", min), ("wall_s", min), ("prepare_s", min), ("check_s", min),
                        ("peak_rss_mb", max), ("peak_anon_mb", max), ("peak_file_mb", max)):  # fmt: skip
            values = [v for v in (row.get(k), r.get(k)) if v is not None]
            row[k] = pick(values) if values else None
        row["killed"] = row.get("killed") or r.get("killed")
        row["cgroup_peak_mb"] = max(
            (v for v in (row.get("cgroup_peak_mb"), r.get("cgroup_peak_mb")) if v), default=None
        )
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10MB,100MB,400MB,1GB")
    parser.add_argument("--recipes", default="charrnn,default,seed")
    parser.add_argument("--workdir", type=Path, default=None, help="where texts and caches go (default: a temp dir)")
    parser.add_argument(
        "--src", default=str(ROOT), help="the source tree(s) to measure (train.py and src/), comma-separated"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--repeat", type=int, default=3, help="first and later runs of the first recipe")
    parser.add_argument("--no-first", action="store_true", help="prepare once, unmeasured, and time later runs only")
    parser.add_argument("--cgroup-mb", type=int, default=0, help="run each training in a memory cgroup of this limit")
    parser.add_argument("--name", default="memory_bench", help="file name of the results")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the runs ('' leaves torch's default)")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",")]
    recipes = [r.strip() for r in args.recipes.split(",")]
    trees = [Path(t).resolve() for t in args.src.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="charlstm-membench-"))
    work.mkdir(parents=True, exist_ok=True)
    envs = {t: {**os.environ, "PYTHONPATH": str(t / "src"), "PYTHONUNBUFFERED": "1"} for t in trees}
    for env in envs.values():
        if args.threads:
            # one thread per run by default: on a machine shared with other jobs, torch's thread pool waiting for a
            # busy core makes step times erratic; memory is the same either way
            env["OMP_NUM_THREADS"] = args.threads
    cgroup = memory_cgroup(args.cgroup_mb) if args.cgroup_mb else None
    if args.cgroup_mb and cgroup is None:
        raise SystemExit(f"no memory cgroup can be made here for --cgroup-mb {args.cgroup_mb}; run without it")
    header = [
        cpu_capability().line(),
        f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine: wall times vary)",
        f"source tree(s): {', '.join(map(str, trees))}; work dir: {work}; "
        f"OMP_NUM_THREADS={envs[trees[0]].get('OMP_NUM_THREADS', 'unset')}",
    ]
    if cgroup is not None:
        header.append(f"every training run in memory cgroup {cgroup} limited to {args.cgroup_mb} MB")
    print("\n".join(header), flush=True)
    results = []
    try:
        for name in sizes:
            results += bench_size(name, args, recipes, trees, envs, work, cgroup)
    finally:
        if cgroup is not None:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
    several = len(trees) > 1
    lines = [*[f"    {h}" for h in header], "",
             f"| corpus |{' tree |' * several} recipe | run | runs | start-up (s) | wall (s) | after start-up (s) "
             "| peak RSS (MB) | RssAnon (MB) | RssFile (MB) |",
             f"|---|{'---|' * several}---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summarize(results):
        prep = (
            f" (prepare {r['prepare_s']:.1f} s, check {r['check_s']:.3f} s)" if r.get("prepare_s") is not None else ""
        )
        tree = f" {r['tree']} |" if several else ""
        train_s = "" if r["startup_s"] is None else f"{r['wall_s'] - r['startup_s']:.1f}"
        killed = " (killed)" if r.get("killed") else ""
        if r.get("cgroup_peak_mb") is not None:
            killed += f" (cgroup charged {r['cgroup_peak_mb']:,} MB)"
        lines.append(f"| {r['size']} |{tree} {r['recipe']} | {r['run']}{prep}{killed} | {r['runs']} | "
                     f"{r['startup_s']} | {r['wall_s']:.1f} | {train_s} | {r['peak_rss_mb']:,} | "
                     f"{r['peak_anon_mb']:,} | {r['peak_file_mb']:,} |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(table)
    (args.out / f"{args.name}.json").write_text(json.dumps({"header": header, "results": results}, indent=1) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def bench_size(name: str, args, recipes: list[str], trees: list[Path], envs: dict, work: Path,
               cgroup: Path | None) -> list[dict]:  # fmt: skip
    """The runs of one corpus size: first runs (preparing) and later runs of each tree, trees interleaved."""
    size = SIZES[name]
    free = shutil.disk_usage(work).free
    if free < 2.5 * size + (1 << 30):
        print(f"{name}: skipped, {free / 1e9:.1f} GB free in {work} (needs {(2.5 * size + (1 << 30)) / 1e9:.1f})")
        return []
    text = work / f"text-{name}.txt"
    if not text.is_file() or text.stat().st_size != size:
        synthetic_text(text, size)
    data_dir = work / f"data-{name}"
    if args.no_first:
        check_seconds(text, data_dir, envs[trees[0]])  # prepares it unless prepared already
        plan = []
    else:
        plan = [(recipes[0], "first", t) for _ in range(args.repeat) for t in trees]
    plan += [(recipes[0], "later", t) for _ in range(args.repeat) for t in trees]
    plan += [(r, "later", t) for r in recipes[1:] for t in trees]
    results = []
    for recipe, when, tree in plan:
        if when == "first":
            shutil.rmtree(data_dir, ignore_errors=True)  # a first run prepares the corpus
        if cgroup is not None:
            evict(data_dir)
            cgroup_peak_mb(cgroup)
        label = f"{name}-{tree.name}-{recipe}-{when}"
        run_dir = work / "runs" / label
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, str(tree / "train.py"), "data=file", f"data.path={text}", *RECIPES[recipe],
               *COMMON, f"paths.data_dir={data_dir}", f"paths.outputs_root={work / 'runs'}",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
        row = {"size": name, "tree": tree.name, "recipe": recipe, "run": when,
               **measure(cmd, work, envs[tree], work / f"{label}.log", cgroup)}  # fmt: skip
        row["startup_s"] = startup_seconds(run_dir / "train.log", row.pop("started"))
        metas = list(data_dir.glob("prepared/*/meta.json"))
        if when == "first" and metas:
            row["prepare_s"] = json.loads(metas[0].read_text())["seconds"]
            row["check_s"] = check_seconds(text, data_dir, envs[tree])
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


if __name__ == "__main__":
    main()
