"""Side-by-side measurements of home-made performance machinery against the plain library path: source trees
(``--src OLD,NEW``) run the same cases in worker processes, interleaved (A, B, A, B ...), best of each.

    python benchmarks/machinery_bench.py --src /path/to/old,. --only generate,train
    python benchmarks/machinery_bench.py --only shuffle

generate: chars/s of ``Generator.generate`` (stateful, temperature 0.8, a 50-char prompt, an untrained 2 x 300 model
over a 38-char vocabulary: speed does not depend on the weights) for 1, 8 and 32 samples with 1 and 2 torch
threads; "one loop" passes ``on_chars`` (a no-op), which runs every row in one loop whatever the thread count.
train: milliseconds of one training step (forward, backward, Adam) of the ``experiment=seed`` network (normalized
input, 2 x 300, dropout 0.2, batch 30 x seq_len 50, target the last char), same seed, without Lightning around it.
shuffle: seconds and peak memory to produce a whole epoch's order of n windows, as ``torch.randperm`` and as the
constant-memory ``FeistelPermutation``, each in a fresh process. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = [*"\n !',-.:;?abcdefghijklmnopqrstuvwxyz", "&", "]"]  # 38 chars, like lowercase Macbeth's
GEN_CASES = [(1, 1), (1, 2), (8, 1), (8, 2), (32, 1), (32, 2)]  # (samples, torch threads)


def gen_worker(length: int, repeats: int, threads: tuple[int, ...] = (1, 2)) -> dict:
    import time

    import torch

    from charlstm.core.net import CharLSTM
    from charlstm.core.sampling import Generator
    from charlstm.core.vocab import CharVocab

    torch.manual_seed(0)
    net = CharLSTM(len(VOCAB), 300, 2, 0.2, "normalized").eval()
    gen = Generator(net, CharVocab(VOCAB), "normalized", 50)
    prompt = "".join(VOCAB[i] for i in torch.randint(len(VOCAB), (50,)).tolist())
    out = {}
    for samples, n in GEN_CASES:
        if n not in threads:
            continue
        for loop, on_chars in (("auto", None), ("one loop", lambda chars: None)):
            torch.set_num_threads(n)
            gen.generate(prompt, 20, 0.8, num_samples=samples, on_chars=on_chars)  # warm-up
            best = float("inf")
            for r in range(repeats):
                start = time.perf_counter()
                gen.generate(prompt, length, 0.8, num_samples=samples, seed=r, on_chars=on_chars)
                best = min(best, time.perf_counter() - start)
            out[f"{samples}/{n}/{loop}"] = length * samples / best
    return out


def train_worker(steps: int) -> dict:
    import time

    import torch
    import torch.nn.functional as F

    from charlstm.core.net import CharLSTM

    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        net = CharLSTM(len(VOCAB), 300, 2, 0.2, "normalized").train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x = torch.randint(len(VOCAB), (30, 50)).float().div_(len(VOCAB)).unsqueeze(-1)
        y = torch.randint(len(VOCAB), (30,))
        times = []
        for i in range(steps + 3):
            start = time.perf_counter()
            logits, _ = net(x, last_only=True)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 3:
                times.append(time.perf_counter() - start)
        out[f"step ms/{threads}"] = 1000 * sorted(times)[len(times) // 4]  # first quartile: the least disturbed
        out[f"loss after {steps + 3} steps/{threads}"] = float(loss)
    return out


def shuffle_worker(n: int, how: str) -> dict:
    import resource
    import time

    import torch

    from charlstm.data.windows import FeistelPermutation, ShuffledWindows

    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if how == "randperm":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        total = int(order[:: ShuffledWindows.BLOCK].sum())
    else:
        permute, total = FeistelPermutation(n, 0), 0
        block = ShuffledWindows.BLOCK * 16
        for lo in range(0, n, block):
            total += int(permute(torch.arange(lo, min(lo + block, n)))[:: ShuffledWindows.BLOCK].sum())
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": seconds, "peak_mb": grown / 1024, "check": total}


def worker(tree: Path, call: str) -> dict:
    """Run ``call`` (an expression over this module's worker functions) with ``tree``'s charlstm."""
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{ROOT / 'benchmarks'}"}
    code = f"import json, machinery_bench as m; print(json.dumps(m.{call}))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {call} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(ROOT), help="source trees to compare, comma-separated")
    parser.add_argument("--only", default="generate,train,shuffle")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each tree")
    parser.add_argument("--length", type=int, default=300, help="chars per sample")
    parser.add_argument("--threads", default="1,2", help="torch thread counts of the generate cases")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per case and round (best kept)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per round")
    parser.add_argument("--shuffle-sizes", default="16000000,100000000")
    parser.add_argument("--name", default="machinery_bench")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from benchlib import machine_line

    trees = [Path(t).resolve() for t in args.src.split(",")]
    only = args.only.split(",")
    lines = [f"    {machine_line(1)}", f"    trees: {', '.join(map(str, trees))}", ""]
    best: dict[tuple[str, str, str], float] = {}
    for section, call, better in (("generate", f"gen_worker({args.length}, {args.repeats}, ({args.threads},))", max),
                                  ("train", f"train_worker({args.steps})", min)):  # fmt: skip
        if section not in only:
            continue
        for _ in range(args.rounds):
            for tree in trees:
                found = worker(tree, call)
                print(json.dumps({"section": section, "tree": str(tree), **found}), flush=True)
                for key, value in found.items():
                    old = best.get((section, tree.name, key))
                    best[(section, tree.name, key)] = value if old is None else better(old, value)
        keys = sorted({k for s, _, k in best if s == section}, key=lambda k: [int(p) if p.isdigit() else p
                                                                                 for p in k.split("/")])  # fmt: skip
        lines += [f"| {section} | {' | '.join(t.name for t in trees)} | ratio |", "|---|" + "---:|" * (len(trees) + 1)]
        for key in keys:
            values = [best.get((section, t.name, key)) for t in trees]
            ratio = f"{values[-1] / values[0]:.2f}" if None not in values and values[0] else ""
            lines.append(f"| {key} | {' | '.join('' if v is None else f'{v:,.1f}' for v in values)} | {ratio} |")
        lines.append("")
    if "shuffle" in only:
        lines += ["| shuffle: windows | randperm s | randperm peak MB | Feistel s | Feistel peak MB |",
                  "|---:|---:|---:|---:|---:|"]  # fmt: skip
        for n in map(int, args.shuffle_sizes.split(",")):
            a, b = (worker(trees[-1], f"shuffle_worker({n}, {how!r})") for how in ("randperm", "feistel"))
            lines.append(f"| {n:,} | {a['seconds']:.2f} | {a['peak_mb']:,.0f} | {b['seconds']:.2f} | "
                         f"{b['peak_mb']:,.0f} |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(table)


if __name__ == "__main__":
    main()
