"""Peak memory and start-up time of training on a big text file: the first run (which prepares the corpus into
data/prepared/) and later runs (which memory-map it), for synthetic corpora of growing size.

    python benchmarks/memory_bench.py                       # 10 MB, 100 MB, 400 MB, 1 GB (4 GB: --sizes 4GB)
    python benchmarks/memory_bench.py --sizes 10MB,100MB --recipes charrnn,seed

Each run is `python train.py data=file data.path=BIG experiment=RECIPE trainer.max_steps=20` in a fresh process;
its peak resident memory is the kernel's (``wait4``: ru_maxrss, which counts pages of the memory-mapped id file
the run touched; under DDP, the largest rank's) and its anonymous part is sampled every 20 ms from /proc (under DDP,
summed over the ranks). Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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


def anon_kb(pid: int) -> int:
    """Anonymous resident memory (KB) of ``pid`` and every process it started (a DDP run's other ranks)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                total += int(line.split()[1])
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += anon_kb(int(child))
    except OSError:
        pass
    return total


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


def measure(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd``; wall seconds, peak RSS (MB, the kernel's) and peak anonymous RSS (MB, sampled)."""
    started = time.time()
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak_anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, anon_kb(proc.pid))
            time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return {"wall_s": round(wall, 2), "started": started, "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "peak_anon_mb": round(peak_anon / 1024)}  # fmt: skip


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
    rows: dict[tuple[str, str, str], dict] = {}
    for r in results:
        key = (r["size"], r["recipe"], r["run"])
        row = rows.setdefault(key, {**r, "runs": 0})
        row["runs"] += 1
        for k, pick in (("startup_s", min), ("wall_s", min), ("prepare_s", min), ("check_s", min),
                        ("peak_rss_mb", max), ("peak_anon_mb", max)):  # fmt: skip
            values = [v for v in (row.get(k), r.get(k)) if v is not None]
            row[k] = pick(values) if values else None
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10MB,100MB,400MB,1GB")
    parser.add_argument("--recipes", default="charrnn,default,seed")
    parser.add_argument("--workdir", type=Path, default=None, help="where texts and caches go (default: a temp dir)")
    parser.add_argument("--src", type=Path, default=ROOT, help="the source tree to measure (train.py and src/)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--repeat", type=int, default=3, help="first and later runs of the first recipe")
    parser.add_argument("--name", default="memory_bench", help="file name of the results")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the runs ('' leaves torch's default)")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",")]
    recipes = [r.strip() for r in args.recipes.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="charlstm-membench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(args.src / "src"), "PYTHONUNBUFFERED": "1"}
    if args.threads:
        # one thread per run by default: on a machine shared with other jobs, torch's thread pool waiting for a
        # busy core makes step times erratic; memory is the same either way
        env["OMP_NUM_THREADS"] = args.threads
    header = [
        cpu_capability().line(),
        f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine: wall times vary)",
        f"source tree: {args.src}; work dir: {work}; OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}",
    ]
    print("\n".join(header), flush=True)
    results = []
    for name in sizes:
        size = SIZES[name]
        free = shutil.disk_usage(work).free
        if free < 2.5 * size + (1 << 30):
            print(f"{name}: skipped, {free / 1e9:.1f} GB free in {work} (needs {(2.5 * size + (1 << 30)) / 1e9:.1f})")
            continue
        text = work / f"text-{name}.txt"
        if not text.is_file() or text.stat().st_size != size:
            synthetic_text(text, size)
        data_dir = work / f"data-{name}"
        plan = [(recipes[0], "first")] * args.repeat + [(recipes[0], "later")] * args.repeat
        plan += [(r, "later") for r in recipes[1:]]
        for recipe, when in plan:
            if when == "first":
                shutil.rmtree(data_dir, ignore_errors=True)  # a first run prepares the corpus
            run_dir = work / "runs" / f"{name}-{recipe}-{when}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = [sys.executable, str(args.src / "train.py"), "data=file", f"data.path={text}", *RECIPES[recipe],
                   *COMMON, f"paths.data_dir={data_dir}", f"paths.outputs_root={work / 'runs'}",
                   f"hydra.run.dir={run_dir}"]  # fmt: skip
            row = {"size": name, "recipe": recipe, "run": when,
                   **measure(cmd, work, env, work / f"{name}-{recipe}-{when}.log")}  # fmt: skip
            row["startup_s"] = startup_seconds(run_dir / "train.log", row.pop("started"))
            metas = list(data_dir.glob("prepared/*/meta.json"))
            if when == "first" and metas:
                row["prepare_s"] = json.loads(metas[0].read_text())["seconds"]
                row["check_s"] = check_seconds(text, data_dir, env)
            results.append(row)
            print(json.dumps(row), flush=True)
    lines = [*[f"    {h}" for h in header], "",
             "| corpus | recipe | run | runs | start-up (s) | wall (s) | peak RSS (MB) | anonymous, all ranks (MB) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summarize(results):
        prep = (
            f" (prepare {r['prepare_s']:.1f} s, check {r['check_s']:.3f} s)" if r.get("prepare_s") is not None else ""
        )
        lines.append(f"| {r['size']} | {r['recipe']} | {r['run']}{prep} | {r['runs']} | {r['startup_s']} | "
                     f"{r['wall_s']:.1f} | {r['peak_rss_mb']:,} | {r['peak_anon_mb']:,} |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(table)
    (args.out / f"{args.name}.json").write_text(json.dumps({"header": header, "results": results}, indent=1) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
