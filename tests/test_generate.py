"""The generation entry point end to end (train -> checkpoint -> generate), its config checks and one-line errors,
and the text-sample callback that writes samples to TensorBoard and the console during training."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from charlstm.app.generate import generate
from charlstm.app.train import train
from charlstm.core.errors import CheckpointError, ConfigError, VocabError
from charlstm.training.callbacks import TextSample, as_markdown
from tests import forkserver
from tests.conftest import ROOT, TINY, compose_cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> dict:
    """One tiny 2-epoch training run with the text-sample callback on (sanity check included, to be skipped)."""
    tmp = tmp_path_factory.mktemp("gen")
    cfg = compose_cfg("train", [*TINY, "trainer.max_epochs=2", "trainer.num_sanity_val_steps=1",
                                "callbacks.text_sample.length=40", "callbacks.text_sample.prompt='The '"])  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.outputs_root, cfg.paths.data_dir = str(tmp / "run"), str(tmp), str(data_dir)
    _metrics, objects = train(cfg)
    return {"ckpt": tmp / "run" / "checkpoints" / "last.ckpt", "root": tmp, "objects": objects}


def gen_cfg(*overrides: str) -> DictConfig:
    return compose_cfg("generate", list(overrides))


# -- generate(cfg) -----------------------------------------------------------------------------------------------


# Run in a fresh interpreter where the training floor cannot be imported at all: generation must not need it.
ONLY_THE_CHECKPOINT = """
import json, sys
for name in ("pytorch_lightning", "lightning_fabric", "charlstm.data.corpus", "charlstm.training.datamodule",
             "charlstm.training.model", "charlstm.app.train"):
    sys.modules[name] = None  # any import of these raises ImportError
from omegaconf import OmegaConf
from charlstm.app.generate import generate
for yaml in sys.argv[1:]:
    print(json.dumps(generate(OmegaConf.create(yaml))))
"""


def test_generation_needs_nothing_but_the_checkpoint_file(run, tmp_path):
    alone = tmp_path / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(run["ckpt"], alone)
    configs = [
        OmegaConf.to_yaml(gen_cfg("ckpt=model.ckpt", "prompt=The king", "length=50")),
        OmegaConf.to_yaml(gen_cfg(f"ckpt={alone}", "prompt=the king", "length=50")),
    ]
    proc = subprocess.run([sys.executable, "-c", ONLY_THE_CHECKPOINT, *configs], cwd=alone.parent,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    relative, absolute = (json.loads(line) for line in proc.stdout.splitlines())
    assert len(relative) == 1 and relative[0].startswith("the king") and len(relative[0]) == len("the king") + 50
    assert relative == absolute
    assert relative == generate(gen_cfg(f"ckpt={alone}", "prompt=the king", "length=50"))  # same text in-process
    assert sorted(p.name for p in alone.parent.iterdir()) == ["model.ckpt"]  # nothing written


def test_long_batched_generation_is_reproducible_across_noise_refills_and_threads(run):
    """600 chars outlast the 256-step noise buffer: the refills and the thread count keep the text."""
    base = (f"ckpt={run['ckpt']}", "prompt=the", "length=600", "num_samples=3", "temperature=1.0")
    one = generate(gen_cfg(*base, "seed=7", "threads=1"))
    assert all(len(t) == len("the") + 600 for t in one)
    assert len(set(one)) == 3  # the samples draw their own noise
    assert generate(gen_cfg(*base, "seed=7", "threads=1")) == one
    assert generate(gen_cfg(*base, "seed=7", "threads=2")) == one
    other = generate(gen_cfg(*base, "seed=8", "threads=2"))
    assert other != one
    # the tail (drawn after a refill) differs too: the refill draws fresh noise, it does not repeat the buffer
    assert [t[300:] for t in other] != [t[300:] for t in one]
    assert all(t[3 + 256 :] != t[3 : 3 + 344] for t in one)


def test_same_seed_same_text_different_seed_differs(run):
    base = (f"ckpt={run['ckpt']}", "prompt=to be", "length=80", "temperature=1.0")
    first = generate(gen_cfg(*base, "seed=1"))
    assert generate(gen_cfg(*base, "seed=1")) == first
    assert generate(gen_cfg(*base, "seed=2")) != first
    for mode in ("stateful", "window"):
        greedy = generate(gen_cfg(*base, "temperature=0", f"mode={mode}", "num_samples=2"))
        assert greedy[0] == greedy[1]


def test_ckpt_last_is_the_newest_run(run):
    cfg = gen_cfg("ckpt=last", f"outputs_root={run['root']}", "length=30", "seed=3")
    assert generate(cfg) == generate(gen_cfg(f"ckpt={run['ckpt']}", "length=30", "seed=3"))


def test_one_sample_streams_several_come_under_headers_and_output_is_written(run, tmp_path):
    stream = io.StringIO()
    texts = generate(gen_cfg(f"ckpt={run['ckpt']}", "prompt=fair", "length=25", f"output={tmp_path}/one.txt"), stream)
    assert stream.getvalue() == texts[0] + "\n"
    assert (tmp_path / "one.txt").read_text(encoding="utf-8") == texts[0] + "\n"

    stream = io.StringIO()
    out = tmp_path / "sub" / "three.txt"
    texts = generate(gen_cfg(f"ckpt={run['ckpt']}", "prompt=fair", "length=25", "num_samples=3", f"output={out}"),
                     stream)  # fmt: skip
    shown = stream.getvalue()
    assert shown.startswith("=== sample 1 of 3 ===\n" + texts[0] + "\n")
    assert all(f"=== sample {i + 1} of 3 ===\n{t}\n" in shown for i, t in enumerate(texts))
    assert out.read_text(encoding="utf-8") == shown + "\n"


def test_prompt_file_and_unknown_chars(run, tmp_path):
    (tmp_path / "p.txt").write_text("Thou shalt get kings\n", encoding="utf-8")
    texts = generate(gen_cfg(f"ckpt={run['ckpt']}", f"prompt_file={tmp_path}/p.txt", "length=10"))
    assert texts[0].startswith("thou shalt get kings\n")
    with pytest.raises(ConfigError, match=r"^both prompt and prompt_file are set; pass one of them$"):
        generate(gen_cfg(f"ckpt={run['ckpt']}", f"prompt_file={tmp_path}/p.txt", "prompt=x"))
    with pytest.raises(ConfigError, match=r"^prompt_file=.*nope\.txt does not exist; pass the path of a text file$"):
        generate(gen_cfg(f"ckpt={run['ckpt']}", f"prompt_file={tmp_path}/nope.txt"))
    with pytest.raises(VocabError, match=r"^the prompt has 2 character\(s\) the model's vocabulary lacks: '#', '7';"):
        generate(gen_cfg(f"ckpt={run['ckpt']}", "prompt='king #7'"))
    skipped = generate(gen_cfg(f"ckpt={run['ckpt']}", "prompt='king #7'", "unknown=skip", "length=5", "temperature=0"))
    assert skipped == generate(gen_cfg(f"ckpt={run['ckpt']}", "prompt='king '", "length=5", "temperature=0"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("length=-1", "length=-1 is not allowed: it must be an integer >= 0"),
        ("temperature=-1", "temperature=-1 is not allowed: it must be a number >= 0 (0 is greedy argmax)"),
        ("top_p=0", "top_p=0 is not allowed: it must be a number with 0 < top_p <= 1 (1 keeps every char)"),
        ("top_k=1.5", "top_k=1.5 is not allowed: it must be an integer >= 0 (0 keeps every char)"),
        ("num_samples=0", "num_samples=0 is not allowed: it must be an integer >= 1"),
        ("mode=sliding", "mode='sliding' is not allowed: it must be stateful or window"),
        ("device=tpu", "device='tpu' is not allowed: it must be cpu, gpu or auto"),
        ("unknown=keep", "unknown='keep' is not allowed: it must be error or skip"),
        ("ckpt=null", "ckpt is not set; pass ckpt=PATH to a .ckpt file or ckpt=last"),
    ],
)
def test_bad_settings_are_one_line_config_errors(run, override, message):
    with pytest.raises(ConfigError) as info:
        generate(gen_cfg(f"ckpt={run['ckpt']}", override))
    assert str(info.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_device_gpu_without_cuda_is_one_line(run):
    with pytest.raises(ConfigError, match=r"^device=gpu but no CUDA GPU is visible to torch .*; use device=cpu"):
        generate(gen_cfg(f"ckpt={run['ckpt']}", "device=gpu"))


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist; pass ckpt=PATH to a \.ckpt file or ckpt=last$"):
        generate(gen_cfg(f"ckpt={tmp_path}/none.ckpt"))
    with pytest.raises(CheckpointError, match=r"^no last\.ckpt under "):
        generate(gen_cfg("ckpt=last", f"outputs_root={tmp_path}"))


# -- python generate.py ------------------------------------------------------------------------------------------


class Shell:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def cli(*args: str) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, str(ROOT / "generate.py"), *args], ROOT, timeout=120)


@pytest.mark.slow
def test_cli_prints_the_text(run, tmp_path):
    proc = cli(f"ckpt={run['ckpt']}", "prompt=Fair is foul", "length=30", "seed=5")
    assert proc.returncode == 0, proc.stderr
    expected = generate(gen_cfg(f"ckpt={run['ckpt']}", "prompt=Fair is foul", "length=30", "seed=5"))[0]
    assert proc.stdout == expected + "\n"


@pytest.mark.slow
def test_cli_refuses_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"hyper_parameters": {"vocab": Shell(f"touch {marker}")}, "state_dict": {}}, tmp_path / "evil.ckpt")
    proc = cli(f"ckpt={tmp_path / 'evil.ckpt'}")
    assert proc.returncode == 1
    assert re.fullmatch(
        f"error: checkpoint {re.escape(str(tmp_path / 'evil.ckpt'))} was refused: loading it would call "
        r"\w+\.system, and a safe load runs nothing; load only checkpoints written by charlstm\n",
        proc.stderr,
    ), proc.stderr
    assert proc.stdout == "" and not marker.exists()


@pytest.mark.slow
def test_cli_unknown_chars_are_one_line(run):
    proc = cli(f"ckpt={run['ckpt']}", "prompt='king #7'")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (
        "error: the prompt has 2 character(s) the model's vocabulary lacks: '#', '7'; "
        "remove them or pass unknown=skip to drop them\n"
    )


# -- the text-sample callback -------------------------------------------------------------------------------------


def test_callback_samples_after_each_validation_but_not_the_sanity_check(run):
    callback = next(cb for cb in run["objects"].callbacks if isinstance(cb, TextSample))
    trainer = run["objects"].trainer
    steps = [step for step, _ in callback.texts]
    assert len(steps) == 2 and steps[-1] == trainer.global_step  # two epochs, the sanity check skipped
    assert all(text.startswith("the ") and len(text) == 44 for _, text in callback.texts)


def test_callback_writes_tensorboard_text(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((run["root"] / "run").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    logged = acc.Tensors("samples/text/text_summary")
    callback = next(cb for cb in run["objects"].callbacks if isinstance(cb, TextSample))
    assert [e.step for e in logged] == [step for step, _ in callback.texts]
    assert logged[-1].tensor_proto.string_val[0].decode() == as_markdown(callback.texts[-1][1])


def test_callback_prints_on_the_console_and_respects_every_n_epochs(make_cfg, capsys):
    cfg = make_cfg("trainer.max_epochs=2", "callbacks.text_sample.every_n_epochs=2", "callbacks.text_sample.length=30",
                   "logger=none", "sample.length=0")  # fmt: skip
    _metrics, objects = train(cfg)
    callback = next(cb for cb in objects.callbacks if isinstance(cb, TextSample))
    assert len(callback.texts) == 1
    out = capsys.readouterr().out
    assert f"sample at epoch 1, step {callback.texts[0][0]}:\n{callback.texts[0][1]}\n" in out


def test_callback_settings_are_checked():
    with pytest.raises(ConfigError, match=r"^callbacks\.text_sample\.top_p=2 is not allowed"):
        TextSample(top_p=2)
    with pytest.raises(ConfigError, match=r"^callbacks\.text_sample\.every_n_epochs=0 is not allowed"):
        TextSample(every_n_epochs=0)


def test_markdown_keeps_lines_and_symbols():
    assert as_markdown("a *b*\n  c") == "    a *b*\n      c"
