"""Fine-tuning from the shipped base model against training from scratch, at the same time budgets, on small texts
that are not Shakespeare (docs/finetune.md).

The texts are built from files every Python installation (and a Debian-like system) has, into data/finetune/
(git-ignored; nothing third-party is committed): `licenses`, the prose of the license texts under
/usr/share/common-licenses, and `code`, modules of the Python standard library. Each is cut to 80,000 chars.

For every text and budget the two arms run one after the other, in alternating order (scratch first, then
init_from first, ...), so the machine's load hits both alike. Each arm is `python train.py data=file data.path=TEXT
trainer.max_time=BUDGET` plus --args (the default recipe from scratch, keeping case: data.lowercase=false), and
`init_from=base` plus --init-args on top for the other; each is scored by `python eval.py` on its best checkpoint
over the whole validation split (the text's last 10%).

    python benchmarks/finetune_bench.py                      # licenses and code: 30 s, 90 s, 5 min each
    python benchmarks/finetune_bench.py --plan licenses:30 --init-args model.lr=0.001
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from benchlib import machine_line

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CHARS = 80_000
LICENSES = ["GPL-3", "MPL-2.0", "Apache-2.0", "GPL-2", "CC0-1.0", "Artistic"]
STDLIB = ["textwrap.py", "shlex.py", "heapq.py", "string.py", "fnmatch.py", "colorsys.py", "bisect.py", "glob.py"]
DEFAULT_PLAN = "licenses:30,90,300 code:30,90,300"


def build_texts(folder: Path) -> dict[str, Path]:
    """The small texts, rebuilt the same way each time from files on this machine."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = {
        "licenses": [Path("/usr/share/common-licenses") / n for n in LICENSES],
        "code": [Path(sysconfig.get_paths()["stdlib"]) / n for n in STDLIB],
    }
    paths = {}
    for name, files in sources.items():
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())[:CHARS]
        if len(text) < CHARS:
            raise SystemExit(f"{name}: only {len(text)} chars found in {[str(f) for f in files]}")
        path = folder / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
        paths[name] = path
    return paths


def budget_text(seconds: int) -> str:
    return f"00:00:{seconds // 60:02d}:{seconds % 60:02d}"


def run_arm(text: Path, seconds: int, extra: list[str], folder: Path) -> dict:
    """Train one arm in its own folder and score its best checkpoint on the whole validation split."""
    command = [sys.executable, "train.py", "data=file", f"data.path={text}", f"trainer.max_time={budget_text(seconds)}",
               "logger=none", "sample.length=0", "trainer.enable_progress_bar=false", f"hydra.run.dir={folder}",
               *extra]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    best = sorted((folder / "checkpoints").glob("best-*.ckpt")) or [folder / "checkpoints" / "last.ckpt"]
    out = folder / "score.json"
    scored = subprocess.run([sys.executable, "eval.py", f"ckpt={best[-1]}", f"output={out}"], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    if scored.returncode != 0:
        raise SystemExit(f"eval.py on {best[-1]} failed:\n{scored.stderr[-2000:]}")
    score = json.loads(out.read_text())
    steps = [line for line in done.stdout.splitlines() + done.stderr.splitlines() if line.startswith("val/bpc:")]
    return {"val_bpc": score["bits_per_char"], "chars": score["chars"], "wall_s": round(wall, 1),
            "final_line": steps[-1] if steps else ""}  # fmt: skip


def markdown(results: dict) -> str:
    lines = [
        "# Fine-tuning from the base model vs. training from scratch",
        "",
        f"Machine: {results['machine']}",
        "",
        f"From scratch: `{results['scratch_command']}`; init_from: the same plus `{' '.join(results['init_args'])}`. "
        "Validation bits/char of each run's best checkpoint on the whole validation split (the text's last 10%), "
        "scored by eval.py. Lower is better.",
        "",
        "| text | chars | budget | from scratch | init_from=base | difference |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "scratch" not in row or "init" not in row:
            arm = "scratch" if "scratch" in row else "init"
            lines.append(f"| {row['text']} | {row['text_chars']:,} | {row['budget_s']} s | "
                         + (f"{row[arm]['val_bpc']:.3f} | - | - |" if arm == "scratch" else
                            f"- | {row[arm]['val_bpc']:.3f} | - |"))  # fmt: skip
            continue
        diff = row["init"]["val_bpc"] - row["scratch"]["val_bpc"]
        lines.append(
            f"| {row['text']} | {row['text_chars']:,} | {row['budget_s']} s | {row['scratch']['val_bpc']:.3f} | "
            f"{row['init']['val_bpc']:.3f} | {diff:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default=DEFAULT_PLAN, help=f"TEXT:SECONDS,... separated by spaces [{DEFAULT_PLAN}]")
    parser.add_argument("--args", default="data.lowercase=false", help="overrides of both arms [data.lowercase=false]")
    parser.add_argument("--init-args", default="", help="overrides of the init_from arm besides init_from=base")
    parser.add_argument("--name", default="finetune_bench", help="results file name under benchmarks/results/")
    parser.add_argument("--arms", default="scratch,init", help="which arms to run (scratch, init) [scratch,init]")
    args = parser.parse_args()
    texts = build_texts(ROOT / "data" / "finetune")
    init_args = ["init_from=base", *args.init_args.split()]
    results = {"machine": machine_line(), "init_args": init_args, "rows": [],
               "scratch_command": f"python train.py data=file data.path=TEXT trainer.max_time=BUDGET {args.args}"
               }  # fmt: skip
    print(results["machine"], flush=True)
    order = 0
    with tempfile.TemporaryDirectory(prefix="finetune_bench-") as tmp:
        for item in args.plan.split():
            name, budgets = item.split(":")
            for seconds in map(int, budgets.split(",")):
                row = {"text": name, "text_chars": CHARS, "budget_s": seconds}
                both = args.args.split()
                arms = [a for a in [("scratch", both), ("init", [*both, *init_args])] if a[0] in args.arms.split(",")]
                for arm, extra in arms if order % 2 == 0 else arms[::-1]:  # alternate which arm goes first
                    row[arm] = run_arm(texts[name], seconds, extra, Path(tmp) / f"{name}-{seconds}-{arm}")
                    print(f"{name} {seconds:>4} s {arm:>8}: val bpc {row[arm]['val_bpc']:.4f}  "
                          f"({row[arm]['final_line']})", flush=True)  # fmt: skip
                order += 1
                results["rows"].append(row)
                RESULTS.mkdir(parents=True, exist_ok=True)  # saved after every row: a long run keeps what it has
                (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
                (RESULTS / f"{args.name}.md").write_text(markdown(results))
    results["machine_end"] = machine_line()
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
