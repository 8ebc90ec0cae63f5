"""Generation speed: chars/s of the tutorial's window mode and the stateful mode on the same model, in one run.

    python benchmarks/generate_speed.py                 # the README's table (2 x 300 units, seq_len 50)
    python benchmarks/generate_speed.py --profile       # also where the time of one stateful step goes

The model is untrained (speed does not depend on the weights) with a 38-char vocabulary like lowercase Macbeth's;
every mode samples at temperature 0.8 after a prompt of exactly seq_len chars. Each figure is the best of
``--repeats`` timed runs, which filters out other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from charlstm.core.hardware import cpu_capability
from charlstm.core.net import CharLSTM
from charlstm.core.sampling import Generator
from charlstm.core.vocab import CharVocab

BUDGET_S = 8.0
VOCAB = [*"\n !',-.:;?abcdefghijklmnopqrstuvwxyz", "&", "]"]  # 38 chars


def speed(gen: Generator, prompt: str, length: int, batch: int, mode: str, repeats: int) -> tuple[float, float]:
    """(chars/s, CPU seconds used per wall second) of the fastest of ``repeats`` runs; repeats stop early past
    BUDGET_S seconds (a contended machine can make a multi-threaded run very slow)."""
    gen.generate(prompt, min(length, 10), 0.8, num_samples=batch, mode=mode)  # warm-up
    best, cores, spent = float("inf"), 0.0, 0.0
    for r in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        gen.generate(prompt, length, 0.8, num_samples=batch, seed=r, mode=mode)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best:
            best, cores = wall, cpu / wall
        spent += wall
        if spent > BUDGET_S:
            break
    return length * batch / best, cores


def profile(gen: Generator, prompt: str, batch: int, length: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen.generate(prompt, 20, 0.8, num_samples=batch)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        gen.generate(prompt, length, 0.8, num_samples=batch)
    print(f"\nstateful, {batch} sample(s), {length} chars, {torch.get_num_threads()} thread(s):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=300)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--encodings", default="normalized,embedding")
    parser.add_argument("--threads", default="1,2", help="torch CPU thread counts to try, comma-separated")
    parser.add_argument("--batch", type=int, default=32, help="num_samples of the batched run")
    parser.add_argument("--window-chars", type=int, default=60)
    parser.add_argument("--stateful-chars", type=int, default=3000)
    parser.add_argument("--batch-steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print where a stateful step's time goes")
    args = parser.parse_args()

    vocab = CharVocab(VOCAB)
    picks = torch.randint(len(VOCAB), (args.seq_len,), generator=torch.Generator().manual_seed(0))
    prompt = "".join(VOCAB[i] for i in picks)
    threads = [int(t) for t in args.threads.split(",")]
    load_before = os.getloadavg()
    rows = []
    for encoding in args.encodings.split(","):
        torch.manual_seed(0)
        net = CharLSTM(len(vocab), args.units, args.layers, 0.2, encoding).eval()
        gen = Generator(net, vocab, encoding, args.seq_len)
        for n in threads:
            torch.set_num_threads(n)
            window = speed(gen, prompt, args.window_chars, 1, "window", args.repeats)
            single = speed(gen, prompt, args.stateful_chars, 1, "stateful", args.repeats)
            batched = speed(gen, prompt, args.batch_steps, args.batch, "stateful", args.repeats)
            rows += [(encoding, "window", 1, n, *window), (encoding, "stateful", 1, n, *single),
                     (encoding, "stateful", args.batch, n, *batched)]  # fmt: skip
        if args.profile:
            best = {b: max((r for r in rows if r[0] == encoding and r[1] == "stateful" and r[2] == b),
                           key=lambda r: r[4])[3] for b in (1, args.batch)}  # fmt: skip
            for b, length in ((1, 1000), (args.batch, 200)):
                torch.set_num_threads(best[b])
                profile(gen, prompt, b, length)

    print(f"\nmodel: {args.layers} x {args.units} units, vocab {len(vocab)}, seq_len {args.seq_len}, temperature 0.8")
    print(f"{cpu_capability().line()}; load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after\n")
    print("| encoding | mode | samples | threads | chars/s | vs window | CPU cores busy | chars per CPU-second |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for encoding, mode, batch, n, rate, cores in rows:
        window = max(r[4] for r in rows if r[0] == encoding and r[1] == "window")
        print(f"| {encoding} | {mode} | {batch} | {n} | {rate:,.0f} | {rate / window:.1f}x | {cores:.2f} "
              f"| {rate / max(cores, 1e-9):,.0f} |")  # fmt: skip
    print("\n(vs window: against the fastest window-mode run with one sample in this run, same encoding;")
    print("CPU cores busy below the thread count means the threads waited for a core other processes held)")
    print()
    for encoding in args.encodings.split(","):
        for batch in (1, args.batch):
            mine = [r for r in rows if r[0] == encoding and r[1] == "stateful" and r[2] == batch]
            top = max(mine, key=lambda r: r[4])
            print(f"{encoding}, {batch} sample(s): fastest with {top[3]} thread(s), {top[4]:,.0f} chars/s")


if __name__ == "__main__":
    main()
