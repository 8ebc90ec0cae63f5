"""Training benchmarks behind the README's tables: Lightning overhead, achieved GFLOP/s, bits/char against
training time for the tutorial and the default recipe (table + PNG). Peak memory against corpus size:
benchmarks/memory_bench.py.

    python benchmarks/train_bench.py                       # everything (see README for the time it takes)
    python benchmarks/train_bench.py --only overhead,flops --steps 30
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
import torch.nn.functional as F
from benchlib import SHARED_NOTE, Samples, machine_line, quiet, timed
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from charlstm.app.train import train
from charlstm.core.hardware import cpu_capability
from charlstm.core.net import encode_inputs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TUTORIAL = ["experiment=seed"]
DEFAULT: list[str] = []
QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_model_summary=false", "sample.length=0"]


def config(overrides: list[str], out: Path) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train", overrides=[*overrides, *QUIET])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.data_dir = str(ROOT / "data")
    return cfg


def machine() -> str:
    return f"{machine_line()}; pytorch-lightning {pl.__version__}"


# --------------------------------------------------------------------------------------------- 1. overhead
class StepClock(pl.Callback):
    """Wall and CPU seconds of the training batches after ``warmup`` (hooks, logging and optimizer step included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.wall, self.cpu, self.steps = warmup, None, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.wall, self.cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
            self.steps = batch_idx - self.warmup + 1


def project_steps(cfg: DictConfig, module: pl.LightningModule, datamodule, steps: int, warmup: int,
                  **trainer_args) -> tuple[float, float]:  # fmt: skip
    """(wall, CPU) seconds per step of the project's training: its Trainer settings (gradient clipping included),
    callbacks and loggers, with ``trainer_args`` over them; checkpoint saving and validation are left out."""
    clock = StepClock(warmup)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]
    callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.Checkpoint)]  # no saving mid-timing
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer = instantiate(cfg.trainer, max_steps=steps + warmup, limit_val_batches=0, callbacks=[*callbacks, clock],
                          logger=loggers, enable_checkpointing=False, **trainer_args)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return clock.wall / clock.steps, clock.cpu / clock.steps


def plain_steps(
    module: pl.LightningModule, datamodule, steps: int, warmup: int, bf16: bool = False, clip: float | None = None
) -> tuple[float, float]:
    """(wall, CPU) seconds per step of a plain PyTorch loop over the same model, batches, loss and optimizer
    (fused Adam/AdamW, as the project's), under ``torch.autocast(bfloat16)`` when ``bf16``."""
    net, hp, vocab_size = module.net, module.hparams, len(module.hparams.vocab)
    net.train()
    opt_cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
    state = None
    start = None
    for i, (x, y) in enumerate(datamodule.train_dataloader()):
        if i == warmup:
            start = time.perf_counter(), time.process_time()
        x = encode_inputs(x, hp.encoding, vocab_size)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits, s = net(x, state if hp.layout == "streams" else None, last_only=y.dim() == 1)
            loss = F.cross_entropy(logits.reshape(-1, vocab_size).float(), y.reshape(-1))
        if hp.layout == "streams":
            state = (s[0].detach(), s[1].detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        if i + 1 == steps + warmup:
            break
    return (time.perf_counter() - start[0]) / steps, (time.process_time() - start[1]) / steps


def bench_overhead(steps: int, rounds: int, tmp: Path) -> dict:
    cfg = config(TUTORIAL, tmp / "overhead")
    datamodule = instantiate(cfg.data)
    vocab = datamodule.load()
    base = instantiate(cfg.model, _convert_="all", vocab=vocab.to_list(), seq_len=cfg.data.seq_len,
                       layout=cfg.data.layout)  # fmt: skip
    warmup = 5
    light, plain = [], []
    for _ in range(rounds):  # alternated, so drifts in machine load hit both
        light.append(project_steps(cfg, copy.deepcopy(base), datamodule, steps, warmup)[0])
        plain.append(plain_steps(copy.deepcopy(base), datamodule, steps, warmup)[0])
    lm, pm = statistics.median(light), statistics.median(plain)
    return {
        "lightning_ms": lm * 1e3, "plain_ms": pm * 1e3, "ratio": lm / pm, "rounds": rounds, "steps": steps,
        "lightning_all_ms": [round(x * 1e3, 2) for x in light],
        "plain_all_ms": [round(x * 1e3, 2) for x in plain],
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- 2. GFLOP/s
def _gflops(fn, flops: float, reps: int, cpu_time: bool) -> float:
    """The best of ``reps`` timed calls (after a warm-up), in GFLOP/s: a ceiling is what the machine can do."""
    fn()
    best = min(timed(fn)[1 if cpu_time else 0] for _ in range(reps))
    return flops / best / 1e9


def matmul_ceilings(dtype: torch.dtype, cpu_time: bool, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of square matmuls (1024, 2048) in ``dtype``, each way torch runs them on a CPU: MKL's sgemm behind
    ``torch.mm`` (fp32), oneDNN behind ``torch.mm`` (bf16 dispatches there) and oneDNN's linear on mkldnn tensors
    (fp32 and bf16). The ceiling for the dtype is the best of them."""
    out: dict[str, float] = {}
    for n in (1024, 2048):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        am, bm = a.to_mkldnn(), b.to_mkldnn()
        mm = "torch.mm (MKL)" if dtype == torch.float32 else "torch.mm (oneDNN)"
        ways = {
            mm: lambda a=a, b=b: torch.mm(a, b),
            "oneDNN linear, mkldnn tensors": lambda am=am, bm=bm: torch._C._nn.mkldnn_linear(am, bm, None),
        }
        for name, fn in ways.items():
            out[f"{name}, {n}x{n}"] = _gflops(fn, 2 * n**3, reps, cpu_time)
    return out


def bench_all_flops(steps: int, rounds: int, tmp: Path) -> dict:
    """Ceilings for fp32 (and bf16 where the CPU computes it natively), then each recipe's step against them. With
    one thread the figures use CPU time, which a shared machine's other load does not inflate; else wall time."""
    cpu_time = torch.get_num_threads() == 1
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if cpu_capability().bf16 else {})}
    ceilings = {p: matmul_ceilings(dtype, cpu_time) for p, dtype in dtypes.items()}
    return {
        "basis": "CPU" if cpu_time else "wall", "steps": steps, "rounds": rounds, "ceilings": ceilings,
        "ceiling": {p: max(c.values()) for p, c in ceilings.items()},
        "tutorial": bench_flops(TUTORIAL, steps, rounds, tmp, ["fp32"]),  # the tutorial is exact fp32 by design
        "default": bench_flops(DEFAULT, steps, rounds, tmp, list(dtypes)),
    }  # fmt: skip


def step_flops(hp, batch: int, seq_len: int, last_only: bool) -> float:
    """FLOPs of one training step: LSTM gate matmuls + head, backward counted as twice the forward."""
    vocab = len(hp.vocab)
    inp = {"normalized": 1, "onehot": vocab, "embedding": hp.embed_dim}[hp.encoding]
    lstm = sum(2 * 4 * hp.units * ((inp if i == 0 else hp.units) + hp.units) for i in range(hp.layers))
    head = 2 * hp.units * vocab * (1 if last_only else seq_len)
    return 3 * batch * (lstm * seq_len + head)


def bench_flops(recipe: list[str], steps: int, rounds: int, tmp: Path, precisions: list[str]) -> dict:
    """(wall, CPU) ms per step of a plain loop over the recipe's model, for each precision and, in fp32, both of
    torch's CPU LSTM paths; the runs alternate ``rounds`` times, medians reported."""
    cfg = config(recipe, tmp / "flops")
    datamodule = instantiate(cfg.data)
    vocab = datamodule.load()
    module = instantiate(cfg.model, _convert_="all", vocab=vocab.to_list(), seq_len=cfg.data.seq_len,
                         layout=cfg.data.layout)  # fmt: skip
    last_only = cfg.data.layout == "windows" and cfg.data.targets == "last"
    flops = step_flops(module.hparams, cfg.data.batch_size, cfg.data.seq_len, last_only)
    clip = cfg.trainer.get("gradient_clip_val")
    runs = [(p, "oneDNN") for p in precisions] + [("fp32", "native ATen")]
    samples = {run: Samples() for run in runs}
    for _ in range(rounds):
        for precision, path in runs:
            with torch.backends.mkldnn.flags(enabled=path == "oneDNN"):
                one = plain_steps(copy.deepcopy(module), datamodule, steps, 3, precision == "bf16", clip)
            samples[(precision, path)].add(*one)
    return {
        f"{p} {path}": {"precision": p, "path": path, "wall_ms": s.wall_median * 1e3, "cpu_ms": s.cpu_median * 1e3,
                        "gflop_per_step": flops / 1e9}
        for (p, path), s in samples.items()
    }  # fmt: skip


# ------------------------------------------------------------------------------------- 3. bpc against time
class _Curve(pl.Callback):
    """(training seconds, val/bpc) at each validation; time spent validating is not counted as training."""

    def __init__(self):
        self.points: list[tuple[float, int, float]] = []
        self.train_time, self._t = 0.0, None

    def on_train_batch_start(self, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        self.train_time += time.perf_counter() - self._t

    def on_validation_end(self, trainer, module):
        if self.points and self.points[-1][1] == trainer.global_step:
            return  # the end-of-run validation repeats the one at the same step
        if not trainer.sanity_checking and "val/bpc" in trainer.callback_metrics:
            self.points.append((self.train_time, trainer.global_step, float(trainer.callback_metrics["val/bpc"])))


def bench_curve(name: str, recipe: list[str], budget_s: float, tmp: Path, val_windows: int) -> dict:
    b = int(budget_s)
    extra = [f"trainer.max_time='00:{b // 3600:02d}:{b % 3600 // 60:02d}:{b % 60:02d}'", "trainer.max_epochs=-1",
             f"data.val_max_windows={val_windows}", "callbacks.early_stopping=null"]  # fmt: skip
    cfg = config([*recipe, *extra], tmp / f"curve-{name}")
    curve = _Curve()
    from charlstm.app import build

    original = build.instantiate_named

    def with_curve(group):
        built = original(group)
        return [*built, curve] if group is cfg.get("callbacks") else built

    build.instantiate_named = with_curve
    try:
        _, objects = train(cfg)
    finally:
        build.instantiate_named = original
    # the whole validation split, every char, for the best checkpoint of the run
    best = objects.trainer.checkpoint_callback.best_model_path
    full = full_val_bpc(cfg, best, objects.datamodule)
    return {"points": curve.points, "full_val_bpc_best_ckpt": full, "best_ckpt": best}


def full_val_bpc(cfg: DictConfig, ckpt: str, datamodule) -> float:
    datamodule.val_max_windows = None
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    from charlstm.training.model import CharLSTMModule

    ckpt_data = torch.load(ckpt, map_location="cpu", weights_only=True)
    module = CharLSTMModule(**ckpt_data["hyper_parameters"])
    module.load_state_dict(ckpt_data["state_dict"])
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/bpc"]


# ---------------------------------------------------------------------------------------------- report
def plot(curves: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib); no plot written", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, res in curves.items():
        pts = res["points"]
        ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", markersize=3, label=name)
    ax.set_xlabel("training time (s), validation excluded")
    ax.set_ylabel("validation bits/char (50-char context)")
    ax.set_title("Macbeth: validation bits/char against training time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def flops_markdown(f: dict, machine_text: str) -> list[str]:
    basis = f["basis"]
    precisions = [p for p in ("fp32", "bf16") if p in f["ceilings"]]
    out = [f"### Matmul ceilings: GFLOP/s, best of 5 ({basis} time)", "", machine_text, "",
           "| way | " + " | ".join(precisions) + " |", "|---|" + "---|" * len(precisions)]  # fmt: skip
    ways = sorted({w for p in precisions for w in f["ceilings"][p]})
    for way in ways:
        cells = [f"{f['ceilings'][p][way]:.0f}" if way in f["ceilings"][p] else "-" for p in precisions]
        out.append(f"| {way} | " + " | ".join(cells) + " |")
    out += ["| **ceiling (the best)** | " + " | ".join(f"**{f['ceiling'][p]:.0f}**" for p in precisions) + " |", ""]
    out += [f"### Achieved GFLOP/s of the training step, against the ceiling for its precision ({basis} time)", "",
            machine_text, "",
            "| recipe | precision | LSTM path | GFLOP/step | wall ms/step | CPU ms/step | GFLOP/s | share of ceiling |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    over = False
    for recipe in ("tutorial", "default"):
        for r in f.get(recipe, {}).values():
            ms = r["cpu_ms"] if basis == "CPU" else r["wall_ms"]
            gflops = r["gflop_per_step"] / (ms / 1e3)
            share = gflops / f["ceiling"][r["precision"]]
            over |= share > 1
            flag = " (!)" if share > 1 else ""
            cells = [recipe, r["precision"], r["path"], f"{r['gflop_per_step']:.2f}", f"{r['wall_ms']:.1f}",
                     f"{r['cpu_ms']:.1f}", f"{gflops:.0f}", f"{100 * share:.0f}%{flag}"]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
    out += ["", f"FLOPs: LSTM gate matmuls + head, backward counted as 2 x forward; GFLOP/s from the median "
            f"{basis} ms per step of {f['rounds']} alternated rounds of {f['steps']} steps (a plain loop over the "
            "recipe's model and batches, fused Adam/AdamW)."]  # fmt: skip
    if over:
        out.append("(!) above the measured ceiling: the ceiling's runs were slowed by other load; rerun.")
    return [*out, ""]


def markdown(results: dict) -> str:
    out = [f"Machine: {results['machine']}", "", SHARED_NOTE if results.get("shared") else "", ""]
    if "overhead" in results:
        o = results["overhead"]
        out += ["### Lightning overhead (tutorial recipe: batch 30, seq_len 50, 2 x 300, normalized input)", "",
                results["machine"], "",
                "| loop | ms/step (median) |", "|---|---|",
                f"| charlstm (Lightning trainer, callbacks, TensorBoard) | {o['lightning_ms']:.2f} |",
                f"| plain PyTorch loop, same model and batches | {o['plain_ms']:.2f} |",
                f"| **ratio** | **{o['ratio']:.3f}** |", "",
                f"{o['rounds']} alternated rounds of {o['steps']} steps each.", ""]  # fmt: skip
    if "flops" in results:
        out += flops_markdown(results["flops"], results["machine"])
    if "curves" in results:
        out += ["### Validation bits/char against training time", "", results["machine"], "",
                "| recipe | budget (s) | val/bpc at each validation (training s: bpc) | best, full validation split |",
                "|---|---|---|---|"]  # fmt: skip
        for name, c in results["curves"].items():
            pts = ", ".join(f"{p[0]:.0f}: {p[2]:.3f}" for p in c["points"])
            out.append(f"| {name} | {c['budget_s']:.0f} | {pts} | **{c['full_val_bpc_best_ckpt']:.3f} bpc** |")
        out.append("")
    return "\n".join(out)


SECTIONS = ("overhead", "flops", "curves")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per round (overhead, flops)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-tutorial", type=float, default=300)
    ap.add_argument("--budget-default", type=float, default=600)
    ap.add_argument("--curves", default="tutorial,default", help="which recipes the curves section runs")
    ap.add_argument("--val-windows", type=int, default=2000, help="validation subsample during the curve runs")
    ap.add_argument("--shared", action="store_true", help="say in the tables that other jobs shared the machine")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "command": " ".join(sys.argv), "shared": args.shared}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if "overhead" in only:
            results["overhead"] = bench_overhead(args.steps, args.rounds, tmp)
        if "flops" in only:
            results["flops"] = bench_all_flops(args.steps, args.rounds, tmp)
        if "curves" in only:
            curves = {}
            for name, recipe, budget in (("tutorial (experiment=seed)", TUTORIAL, args.budget_tutorial),
                                         ("default (make train)", DEFAULT, args.budget_default)):  # fmt: skip
                if name.split()[0] not in args.curves.split(","):
                    continue
                curves[name] = bench_curve(name.split()[0], recipe, budget, tmp, args.val_windows) | {
                    "budget_s": budget
                }
            results["curves"] = curves
            plot(curves, args.out / "bpc_vs_time.png")
    results["seconds"] = time.perf_counter() - t0
    text = markdown(results) + f"\nTotal benchmark time: {results['seconds'] / 60:.1f} min (`{results['command']}`)\n"
    print(text)
    # a partial run (--only) keeps the full run's files and writes its own beside them
    stem = "train_bench" if only >= set(SECTIONS) else "train_bench-" + "-".join(s for s in SECTIONS if s in only)
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
