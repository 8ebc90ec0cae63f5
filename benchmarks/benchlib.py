"""What every benchmark script shares: the machine line printed with each table, and timing that reports both wall
time and the CPU time the process ran (on a shared machine the two differ)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from charlstm.core.hardware import cpu_capability


def machine_line(threads: int | None = None) -> str:
    """The CPU capability line (AVX2 / AVX-512 / bf16 / AMX, as charlstm.core.hardware reads it), torch's threads,
    Python, and the load average (other processes on the cores) at the time it is printed."""
    threads = torch.get_num_threads() if threads is None else threads
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    python = platform.python_version()
    return f"{cpu_capability().line()}; {threads} torch thread(s); Python {python}; load average {load:.1f}"


SHARED_NOTE = (
    "Measured on a shared machine (other people's jobs were running on the same cores): every comparison is "
    "interleaved in one run (A, B, A, B ...) and reported as medians, and CPU ms (the time the process actually ran) "
    "is given beside wall ms, since wall time also counts the time other processes held the cores."
)


@dataclass
class Samples:
    """Per-repeat seconds of one measured thing: wall clock and the process's CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def quiet() -> None:
    """Benchmark output without the libraries' per-run chatter (device inventory, tips, known warnings)."""
    import logging

    from charlstm.app.logs import quiet_known_warnings

    quiet_known_warnings()
    for name in ("pytorch_lightning", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
