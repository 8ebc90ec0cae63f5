"""Start-up time of the commands, against `python -c "import torch"` (the floor any torch program pays), in one run:
each command once per round, in turn, medians over the rounds.

    python benchmarks/startup_bench.py                   # 9 rounds, a synthetic default-sized checkpoint
    python benchmarks/startup_bench.py --rounds 15 --ckpt outputs/.../checkpoints/last.ckpt
    python benchmarks/startup_bench.py --before /tmp/old  # also generate.py of another checkout, side by side
    python benchmarks/startup_bench.py --only generate.py  # `import torch` and the commands named so
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import SHARED_NOTE, machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def synthetic_checkpoint(path: Path) -> Path:
    """A checkpoint of the default recipe's shape (embedding, 2 x 256, 54 chars), untrained: start-up does not depend
    on the weights, and no training is needed to measure it."""
    from charlstm.core.net import CharLSTM

    vocab = sorted(set("\n !&',-.:;?[]abcdefghijklmnopqrstuvwxyz0123456789\"()"))
    net = CharLSTM(len(vocab), 256, 2, 0.25, "embedding", 64)
    hparams = {"vocab": vocab, "encoding": "embedding", "units": 256, "layers": 2, "embed_dim": 64, "seq_len": 50,
               "layout": "streams", "lowercase": True}  # fmt: skip
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hparams}, path)
    return path


def commands(ckpt: Path, before: Path | None = None) -> dict[str, list[str]]:
    py = sys.executable
    other = {}
    if before is not None:  # the same command from another checkout: its scripts, configs and package
        old = ["env", f"PYTHONPATH={before / 'src'}", py, str(before / "generate.py"), f"ckpt={ckpt}", "length=1"]
        other = {
            f"python generate.py ckpt=X length=1 [{before}]": old,
            f"python generate.py ckpt=X length=1 hydra.verbose=false [{before}]": [*old, "hydra.verbose=false"],
        }
    return {
        'python -c "import torch"': [py, "-c", "import torch"],
        # the floor again without Python's final garbage collection, which the commands skip (charlstm.app.cli)
        'python -c "import torch" (final collection skipped)': [
            py, "-c", "import atexit, gc, torch; atexit.register(gc.freeze)",
        ],
        # what a training command imports, with and without that collection
        'python -c "import pytorch_lightning"': [py, "-c", "import pytorch_lightning"],
        'python -c "import pytorch_lightning" (final collection skipped)': [
            py, "-c", "import atexit, gc, pytorch_lightning; atexit.register(gc.freeze)",
        ],
        "python generate.py ckpt=X length=1": [py, str(ROOT / "generate.py"), f"ckpt={ckpt}", "length=1"],
        **other,
        'python -c "import charlstm.app.generate"': [py, "-c", "import charlstm.app.generate"],
        "python train.py --help": [py, str(ROOT / "train.py"), "--help"],
        "python train.py --cfg job": [py, str(ROOT / "train.py"), "--cfg", "job"],
    }  # fmt: skip


# Bytecode is cached as an installed package has it (pip compiles it): a PYTHONDONTWRITEBYTECODE=1 set in the shell
# would make every run compile the project's modules from source again.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_once(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=ENV)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ckpt", type=Path, default=None, help="a checkpoint to generate from (default: synthetic)")
    ap.add_argument("--shared", action="store_true", help="say in the table that other jobs shared the machine")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--before", type=Path, default=None, help="another checkout whose generate.py runs alongside")
    ap.add_argument("--only", default=None, help="time only `import torch` and the commands whose name holds this")
    args = ap.parse_args()
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ckpt = args.ckpt.resolve() if args.ckpt else synthetic_checkpoint(tmp / "model.ckpt")
        cmds = commands(ckpt, args.before.resolve() if args.before else None)
        base_name = 'python -c "import torch"'
        cmds = {k: v for k, v in cmds.items() if args.only is None or k == base_name or args.only in k}
        for argv in cmds.values():  # warm the file cache; not timed
            run_once(argv, tmp)
        load = [os.getloadavg()[0]]
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.rounds):
            for name, argv in cmds.items():
                times[name].append(run_once(argv, tmp))
        load.append(os.getloadavg()[0])
    base = statistics.median(times[base_name])
    lines = [SHARED_NOTE, ""] if args.shared else []
    lines += ["### Start-up time against `import torch`", "", machine_line(), "",
              "| command | median s | min s | x import torch (medians) |", "|---|---|---|---|"]  # fmt: skip
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| `{name}` | {med:.2f} | {min(ts):.2f} | {med / base:.2f}x |")
    lines += ["", f"{args.rounds} rounds, each command once per round in turn (after one untimed warm-up round); "
              f"load average {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} cores; {env_note}; "
              "bytecode cached, as after an install.",
              f"(`{' '.join(sys.argv)}`)"]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup_bench.md").write_text(text + "\n")
    result = {"times_s": times, "load_average": load, "command": " ".join(sys.argv), "machine": machine_line()}
    (args.out / "startup_bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
