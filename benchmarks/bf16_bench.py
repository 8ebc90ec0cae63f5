"""bf16-mixed against fp32 on the default recipe, in one run: the project's training step (its LightningModule,
Trainer, callbacks and logger) and a plain PyTorch loop over the same model, side by side; then a short real
training of each precision, with their validation bits/char against training time in one picture.

    python benchmarks/bf16_bench.py                           # step speed (1 and all threads) + 90-s curves
    python benchmarks/bf16_bench.py --only step --threads 1 --rounds 5
    python benchmarks/bf16_bench.py --only curves --budget 60
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from benchlib import SHARED_NOTE, Samples, machine_line, quiet
from hydra.utils import instantiate
from train_bench import RESULTS, bench_curve, config, plain_steps, plot, project_steps

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def bench_step(recipe: list[str], threads: int, steps: int, rounds: int, tmp: Path) -> dict:
    """The four runs (project/plain x fp32/bf16) alternated ``rounds`` times at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    cfg = config(recipe, tmp / f"step-{threads}")
    datamodule = instantiate(cfg.data)
    vocab = datamodule.load()
    module = instantiate(cfg.model, _convert_="all", vocab=vocab.to_list(), seq_len=cfg.data.seq_len,
                         layout=cfg.data.layout)  # fmt: skip
    clip = cfg.trainer.get("gradient_clip_val")
    runs = {
        ("project", p): lambda p=p: project_steps(cfg, copy.deepcopy(module), datamodule, steps, 5,
                                                  precision=PRECISIONS[p], max_time=None, **QUIET)
        for p in PRECISIONS
    } | {
        ("plain", p): lambda p=p: plain_steps(copy.deepcopy(module), datamodule, steps, 5, p == "bf16", clip)
        for p in PRECISIONS
    }  # fmt: skip
    samples = {key: Samples() for key in runs}
    load = [os.getloadavg()[0]]
    for _ in range(rounds):
        for key, run in runs.items():
            samples[key].add(*run())
    load.append(os.getloadavg()[0])
    return {
        "threads": threads, "steps": steps, "rounds": rounds, "load_average": load,
        "batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "units": cfg.model.units,
        "runs": {f"{loop} {p}": {"wall_ms": [x * 1e3 for x in s.wall], "cpu_ms": [x * 1e3 for x in s.cpu]}
                 for (loop, p), s in samples.items()},
    }  # fmt: skip


def step_markdown(result: dict, machine_text: str) -> list[str]:
    runs, n = result["runs"], result["threads"]
    out = [f"### Training step, fp32 against bf16-mixed, {n} torch thread(s) (default recipe: batch {result['batch']}, "
           f"seq_len {result['seq_len']}, 2 x {result['units']})", "", machine_text, "",
           "| loop | fp32 ms/step wall / CPU | bf16 ms/step wall / CPU | bf16 steps/s (wall) "
           "| bf16 speed-up wall / CPU |",
           "|---|---|---|---|---|"]  # fmt: skip
    for loop, name in (("project", "charlstm (Lightning trainer, callbacks, TensorBoard)"),
                       ("plain", "plain PyTorch loop, same model and batches")):  # fmt: skip
        f, b = runs[f"{loop} fp32"], runs[f"{loop} bf16"]
        fw, fc, bw, bc = (statistics.median(x) for x in (f["wall_ms"], f["cpu_ms"], b["wall_ms"], b["cpu_ms"]))
        out.append(f"| {name} | {fw:.1f} / {fc:.1f} | {bw:.1f} / {bc:.1f} | {1e3 / bw:.1f} | "
                   f"**{fw / bw:.2f}x** / **{fc / bc:.2f}x** |")  # fmt: skip
    load = result["load_average"]
    out += ["", f"Medians of {result['rounds']} alternated rounds of {result['steps']} steps each (fp32, bf16, "
            f"fp32, bf16 ...); load average {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} cores.",
            ""]  # fmt: skip
    return out


def bench_curves(recipe: list[str], budget: float, val_windows: int, tmp: Path) -> dict:
    """A short real training of each precision (the recipe as `make train` runs it, trainer.max_time = budget)."""
    curves = {}
    for name, precision in PRECISIONS.items():
        load = os.getloadavg()[0]
        run = bench_curve(name, [*recipe, f"trainer.precision={precision}"], budget, tmp, val_windows)
        curves[f"{name} ({precision})"] = run | {"budget_s": budget, "load_average": load}
    return curves


def curves_markdown(curves: dict, machine_text: str) -> list[str]:
    out = ["### Validation bits/char against training time, fp32 against bf16-mixed (default recipe)", "",
           machine_text, "",
           "| precision | budget (s) | steps | val/bpc at each validation (training s: bpc) "
           "| best, full validation split |",
           "|---|---|---|---|---|"]  # fmt: skip
    for name, c in curves.items():
        pts = ", ".join(f"{p[0]:.0f}: {p[2]:.3f}" for p in c["points"])
        steps = c["points"][-1][1] if c["points"] else 0
        out.append(f"| {name} | {c['budget_s']:.0f} | {steps} | {pts} | **{c['full_val_bpc_best_ckpt']:.3f}** |")
    return [*out, ""]


SECTIONS = ("step", "curves")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="torch thread counts for the step table(s)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds of the four runs")
    ap.add_argument("--budget", type=float, default=90, help="seconds of training per precision for the curves")
    ap.add_argument("--curve-threads", type=int, default=None, help="torch threads for the curves (default: all)")
    ap.add_argument("--val-windows", type=int, default=2000, help="validation subsample during the curve runs")
    ap.add_argument("--recipe", default="", help="extra overrides, comma-separated (default: the default recipe)")
    ap.add_argument("--shared", action="store_true", help="say in the tables that other jobs shared the machine")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    quiet()
    only = set(args.only.split(","))
    recipe = [o for o in args.recipe.split(",") if o]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(sys.argv), "shared": args.shared}
    text = [SHARED_NOTE, ""] if args.shared else []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if "step" in only:
            results["step"] = []
            for threads in dict.fromkeys(int(t) for t in args.threads.split(",")):
                result = bench_step(recipe, threads, args.steps, args.rounds, tmp)
                results["step"].append(result)
                text += step_markdown(result, f"{machine_line(threads)}; pytorch-lightning {pl.__version__}")
        if "curves" in only:
            threads = args.curve_threads or os.cpu_count()
            torch.set_num_threads(threads)
            curves = bench_curves(recipe, args.budget, args.val_windows, tmp)
            results["curves"] = curves
            text += curves_markdown(curves, f"{machine_line(threads)}; pytorch-lightning {pl.__version__}")
            png = args.out / "bf16_vs_fp32.png"
            if plot(curves, png):
                text += [f"![validation bits/char against training time, fp32 and bf16-mixed]({png.name})", ""]
    results["seconds"] = time.perf_counter() - t0
    text.append(f"Total benchmark time: {results['seconds'] / 60:.1f} min (`{results['command']}`)")
    print("\n".join(text))
    stem = "bf16_bench" if only >= set(SECTIONS) else "bf16_bench-" + "-".join(s for s in SECTIONS if s in only)
    (args.out / f"{stem}.md").write_text("\n".join(text) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
