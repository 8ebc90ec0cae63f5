"""generate(cfg) -> list[str]: text from a trained checkpoint as one plain function; run() is the Hydra face."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

import torch
from omegaconf import DictConfig

from charlstm.app.config import Rule, check
from charlstm.core import checkpoint
from charlstm.core.errors import ConfigError, TrainingInterrupted, exit_on_error
from charlstm.core.fileio import atomic_write_text
from charlstm.core.hardware import usable_cores
from charlstm.core.sampling import SAMPLING_RULES, Generator, printable

GENERATE_RULES: dict[str, Rule] = {
    **SAMPLING_RULES,
    "seed": ("int?", lambda v: v >= 0, "null (a fresh seed) or an integer >= 0"),
    "device": ("choice", ("cpu", "gpu", "auto"), "cpu, gpu or auto"),
    # more threads than cores only slow generation down, and tens of thousands crash OpenMP
    "threads": (
        "int?",
        lambda v: 1 <= v <= usable_cores(),
        f"null (all cores for a stateful batch, else 1) or an integer from 1 to {usable_cores()}, the CPU cores "
        "this process may use",
    ),
}


def pick_device(name: str) -> torch.device:
    """``cpu``, ``gpu`` (CUDA, which must be there) or ``auto`` (CUDA when torch sees one)."""
    if name == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            f"device=gpu but no CUDA GPU is visible to torch (torch {torch.__version__}, "
            f"cuda build: {torch.version.cuda or 'no'}); use device=cpu or device=auto"
        )
    if name == "gpu" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def device_and_checkpoint(cfg: DictConfig, say_last: bool) -> tuple[torch.device, Path]:
    """The configured device and the checkpoint ``ckpt`` names; with ``say_last``, which run ``ckpt=last`` picked is
    said on stderr (stdout keeps the text or the score alone)."""
    if not cfg.get("ckpt"):
        raise ConfigError("ckpt is not set; pass ckpt=PATH to a .ckpt file or ckpt=last")
    device = pick_device(cfg.device)
    path = checkpoint.resolve(str(cfg.ckpt), cfg.get("outputs_root") or "outputs")
    if str(cfg.ckpt) == "last" and say_last:
        print(f"checkpoint: {path.resolve()}", file=sys.stderr, flush=True)
    return device, path


def threads_for(threads: int | None, num_samples: int, mode: str) -> int:
    """CPU threads: one sample is a chain of small matrix-vector products that a second thread only slows down
    (benchmarks/generate_speed.py); a stateful batch gives torch's threads wider matrices, by default one thread per
    core torch uses."""
    if threads is not None:
        return threads
    return torch.get_num_threads() if mode == "stateful" and num_samples > 1 else 1


def read_prompt(cfg: DictConfig) -> str:
    """``prompt``, or the whole text of ``prompt_file`` (UTF-8), never both."""
    prompt = "" if cfg.get("prompt") is None else str(cfg.prompt)
    path = cfg.get("prompt_file")
    if not path:
        return prompt
    if prompt:
        raise ConfigError("both prompt and prompt_file are set; pass one of them")
    file = Path(str(path)).expanduser()
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"prompt_file={file} does not exist; pass the path of a text file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompt_file={file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"prompt_file={file} cannot be read ({err.strerror or err})") from None


def header(i: int, n: int) -> str:
    return f"=== sample {i + 1} of {n} ==="


def format_samples(texts: list[str]) -> str:
    """One sample as it is; several, each under a header line."""
    if len(texts) == 1:
        return texts[0]
    return "\n".join(f"{header(i, len(texts))}\n{text}\n" for i, text in enumerate(texts))


def write_output(path: str, text: str) -> Path:
    file = Path(path).expanduser()
    try:
        if file.exists() and not file.is_file():  # a device or pipe (/dev/stdout): written in place
            file.write_text(text, encoding="utf-8")
        else:
            atomic_write_text(file, text)
    except OSError as err:
        raise ConfigError(f"output={file} cannot be written ({err.strerror or err}); choose another path") from None
    return file


def generate(cfg: DictConfig, stream: TextIO | None = None) -> list[str]:
    """Generate as configured; returns each sample as prompt + generated text (and writes ``output`` if set).

    With ``stream``, one sample is written to it char by char as it is produced; several are written when the
    batch is done, each under a header.
    """
    check(cfg, GENERATE_RULES)
    device, path = device_and_checkpoint(cfg, say_last=stream is not None)
    gen = Generator.from_checkpoint(path, device)
    prompt = gen.clean_prompt(read_prompt(cfg), cfg.unknown)

    on_chars = None
    # on a terminal control chars are shown escaped; a file or a pipe gets the text as it is
    shown = printable if stream is not None and stream.isatty() else str
    if stream is not None and cfg.num_samples == 1:
        stream.write(shown(prompt))
        stream.flush()

        def on_chars(chars: list[str]) -> None:
            stream.write(shown(chars[0]))
            stream.flush()

    before = torch.get_num_threads()
    torch.set_num_threads(threads_for(cfg.get("threads"), cfg.num_samples, cfg.mode))
    try:
        texts = gen.generate(
            prompt, cfg.length, cfg.temperature, cfg.top_k, cfg.top_p, cfg.num_samples, cfg.seed, cfg.mode,
            cfg.unknown, on_chars,
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    texts = [prompt + text for text in texts]
    if stream is not None:
        stream.write("\n" if cfg.num_samples == 1 else shown(format_samples(texts)))
        stream.flush()
    if cfg.get("output"):
        write_output(str(cfg.output), format_samples(texts) + "\n")
    return texts


@exit_on_error
def run(cfg: DictConfig) -> None:
    """What ``python generate.py`` does: stream the text to stdout."""
    try:
        generate(cfg, stream=sys.stdout)
    except KeyboardInterrupt:
        print(file=sys.stdout, flush=True)
        raise TrainingInterrupted("generation stopped by Ctrl-C") from None
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
