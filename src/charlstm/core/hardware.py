"""What this CPU can do, read at run time: AVX2 / AVX-512 / native bf16 / AMX, and the training precision it
should use by default (``trainer.precision: auto``). Torch only, no Lightning."""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from charlstm.core.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
# x86: avx512_bf16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids); Arm: the bf16 extension (Neoverse V1+)
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class CpuCapability:
    model: str
    cores: int | None
    flags: frozenset[str]
    torch_kernels: str  # the vector ISA torch's CPU kernels were dispatched to, e.g. AVX512

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic (dot products in hardware), not bf16 emulated through fp32."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    def line(self) -> str:
        """One line for logs and benchmark tables."""
        bf16 = next((f for f in BF16_FLAGS if f in self.flags), None)

        def yes(flag: bool) -> str:
            return "yes" if flag else "no"

        return (
            f"CPU: {self.model}, {self.cores} cores; AVX2 {yes(self.avx2)}, AVX-512 {yes(self.avx512)}, "
            f"native bf16 {bf16 or 'no'}, AMX {yes(self.amx)}; torch {torch.__version__} kernels: {self.torch_kernels}"
        )


def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 "flags", Arm "Features"
            flags = frozenset(value.split())
    return model, flags


@cache
def cpu_capability() -> CpuCapability:
    model, flags = _cpuinfo()
    try:
        kernels = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        kernels = "unknown"
    return CpuCapability(model, os.cpu_count(), flags, kernels)


def default_precision() -> str:
    """bf16 mixed precision where the CPU computes bf16 natively and torch uses its vector units; fp32 elsewhere."""
    cap = cpu_capability()
    fast_kernels = cap.torch_kernels not in ("DEFAULT", "NO AVX", "unknown")
    return "bf16-mixed" if cap.bf16 and fast_kernels else "32-true"


def resolve_precision(value: object, accelerator: str = "cpu") -> object:
    """``trainer.precision``: ``auto`` becomes bf16-mixed or 32-true for this machine (said in one log line);
    any other value is kept as it is."""
    if str(value) != AUTO:
        return value
    cap = cpu_capability()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        chosen = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
        log.info("trainer.precision=auto -> %s (GPU)", chosen)
        return chosen
    chosen = default_precision()
    why = "the CPU computes bf16 natively" if chosen == "bf16-mixed" else "the CPU has no native bf16"
    log.info("trainer.precision=auto -> %s: %s (%s)", chosen, why, cap.line())
    return chosen


# -- memory -------------------------------------------------------------------------------------------------------
def _cpu_memory_limits() -> list[int]:
    """The bytes this process can still allocate in main memory, by each limit that can be read here."""
    limits = []
    try:  # what the kernel could give without swapping
        meminfo = Path("/proc/meminfo").read_text()
        limits += [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:  # a container's or a scheduler's cgroup (v2) limit
        cgroup = Path("/sys/fs/cgroup")
        high = (cgroup / "memory.max").read_text().strip()
        if high != "max":
            limits.append(int(high) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    try:  # the address-space limit (ulimit -v), less what the process has mapped already
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(soft - mapped)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return limits


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes this process can still allocate on ``device``: on a CUDA device what the driver reports free; on the
    CPU the least of what the kernel reports available, the room under the process's cgroup limit and the room under
    its address-space limit (ulimit -v). None where nothing can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) if torch.cuda.is_available() else None
    limits = _cpu_memory_limits()
    return max(0, min(limits)) if limits else None


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: what a scheduler allotted), else all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this system (macOS)
        return os.cpu_count() or 1


def check_fits(
    key: str,
    value: int,
    per_item: int,
    device: torch.device | str = "cpu",
    what: str = "item",
    count: int | None = None,
) -> None:
    """A ConfigError naming ``key`` when ``count`` (default: ``value``) items of ``per_item`` bytes each (a lower
    bound of what one item needs at once, from the tensor sizes) cannot fit in the memory ``device`` has available
    now, checked before any is allocated; the message gives the largest value that fits."""
    count = value if count is None else count
    free = available_memory(device)
    need = count * per_item
    if free is None or need <= free:
        return
    where = "the GPU" if torch.device(device).type == "cuda" else "this machine"
    fit = free // max(1, per_item)
    fix = f"lower {key} (at most {fit} could fit)" if fit >= 1 else "use a smaller model or a machine with more memory"
    raise ConfigError(
        f"{key}={value} needs at least {_size(need)} of memory at once ({count} {what}s of {_size(per_item)}), "
        f"more than the {_size(free)} available on {where}; {fix}"
    )
