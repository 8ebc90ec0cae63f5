"""trainer.precision=auto: bf16-mixed where the CPU has native bf16, 32-true elsewhere (one log line); the tutorial
stays exact fp32; generation computes in fp32 and loads bf16-trained checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from charlstm.core import checkpoint, hardware
from charlstm.core.hardware import CpuCapability, resolve_precision
from charlstm.core.sampling import Generator
from tests.conftest import compose_cfg

AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2_ONLY = frozenset({"avx2", "fma"})


def fake_cpu(monkeypatch, flags: frozenset[str], kernels: str = "AVX512") -> None:
    monkeypatch.setattr(hardware, "cpu_capability", lambda: CpuCapability("Test CPU", 2, flags, kernels))


@pytest.mark.parametrize(
    ("flags", "kernels", "expected"),
    [
        (AVX512_BF16, "AVX512", "bf16-mixed"),
        (frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"}), "AVX512", "bf16-mixed"),
        (frozenset({"asimd", "bf16"}), "SVE256", "bf16-mixed"),  # Arm with the bf16 extension
        (frozenset({"avx2", "avx512f"}), "AVX512", "32-true"),  # AVX-512 without bf16: emulated, slower
        (AVX2_ONLY, "AVX2", "32-true"),
        (AVX512_BF16, "DEFAULT", "32-true"),  # torch not using the vector units
    ],
)
def test_auto_picks_bf16_only_with_native_bf16(monkeypatch, caplog, flags, kernels, expected):
    fake_cpu(monkeypatch, flags, kernels)
    with caplog.at_level(logging.INFO, logger="charlstm.core.hardware"):
        assert resolve_precision("auto", "cpu") == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "charlstm.core.hardware"]
    assert len(lines) == 1 and lines[0].startswith(f"trainer.precision=auto -> {expected}: ")
    assert "Test CPU" in lines[0]


@pytest.mark.parametrize("value", ["32-true", "bf16-mixed", "16-mixed", 32])
def test_explicit_precision_is_kept(monkeypatch, caplog, value):
    fake_cpu(monkeypatch, AVX512_BF16)
    with caplog.at_level(logging.INFO, logger="charlstm.core.hardware"):
        assert resolve_precision(value, "cpu") == value
    assert not [r for r in caplog.records if r.name == "charlstm.core.hardware"]


def test_capability_line_names_every_feature():
    line = CpuCapability("X", 4, frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile"}), "AVX512").line()
    assert "AVX2 yes, AVX-512 yes, native bf16 avx512_bf16, AMX yes" in line
    line = CpuCapability("Y", 4, AVX2_ONLY, "AVX2").line()
    assert "AVX2 yes, AVX-512 no, native bf16 no, AMX no" in line and "kernels: AVX2" in line


def test_this_machine_is_read_from_cpuinfo_and_torch():
    hardware.cpu_capability.cache_clear()
    cap = hardware.cpu_capability()
    assert cap.torch_kernels == torch.backends.cpu.get_cpu_capability()
    if cap.flags:  # Linux: the same flags /proc/cpuinfo lists
        assert cap.avx2 == ("avx2" in Path("/proc/cpuinfo").read_text().split())


def test_configs_default_auto_seed_exact_fp32_gpu_unchanged():
    assert compose_cfg("train").trainer.precision == "auto"
    assert compose_cfg("train", ["trainer=cpu"]).trainer.precision == "auto"
    assert compose_cfg("train", ["experiment=seed"]).trainer.precision == "32-true"
    assert compose_cfg("train", ["trainer=gpu"]).trainer.precision == "16-mixed"


def test_train_resolves_auto_before_the_trainer(make_cfg, monkeypatch):
    from charlstm.app.train import train

    fake_cpu(monkeypatch, AVX2_ONLY, "AVX2")
    _, objects = train(make_cfg("trainer.max_steps=2", "logger=none", "sample.length=0", "trainer.limit_val_batches=0",
                                "callbacks.early_stopping=null"))  # fmt: skip
    assert objects.trainer.precision == "32-true"
    assert objects.cfg.trainer.precision == "32-true"  # the saved config says what ran


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, data_dir):
    from omegaconf import open_dict

    from charlstm.app.train import train
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("bf16")
    overrides = ["trainer.precision=bf16-mixed", "trainer.max_steps=30", "logger=none", "sample.length=0",
                 "callbacks.early_stopping=null", "model.encoding=embedding"]  # fmt: skip
    cfg = compose_cfg("train", [*TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.outputs_root, cfg.paths.data_dir = str(tmp / "run"), str(tmp), str(data_dir)
    _, objects = train(cfg)
    assert objects.trainer.precision == "bf16-mixed"
    return {"ckpt": tmp / "run" / "checkpoints" / "last.ckpt", "objects": objects}


def test_generation_from_a_bf16_mixed_checkpoint_computes_in_fp32(bf16_run):
    gen = Generator.from_checkpoint(bf16_run["ckpt"])
    assert {p.dtype for p in gen.net.parameters()} == {torch.float32}
    trained = bf16_run["objects"].model.net
    for (name, mine), (_, theirs) in zip(gen.net.state_dict().items(), trained.state_dict().items(), strict=True):
        assert torch.equal(mine, theirs.float()), name
    text = gen.generate("the ", 40, 0.8, seed=3)[0]
    assert len(text) == 40 and text == gen.generate("the ", 40, 0.8, seed=3)[0]


def test_bf16_weights_load_into_an_fp32_network(bf16_run, tmp_path):
    """A checkpoint whose weights are bf16 tensors (bf16-true training) still gives an fp32 generator."""
    ckpt = torch.load(bf16_run["ckpt"], weights_only=True)
    ckpt["state_dict"] = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()
    }
    path = tmp_path / "bf16-weights.ckpt"
    torch.save(ckpt, path)
    net = checkpoint.build_net(checkpoint.load(path), path)
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert torch.equal(net.head.weight, ckpt["state_dict"]["net.head.weight"].float())
    text = Generator.from_checkpoint(path).generate("the ", 30, 0.0)[0]
    assert len(text) == 30


def test_bf16_mixed_clips_the_fused_optimizer(make_cfg, monkeypatch):
    """bf16-mixed with trainer.gradient_clip_val: the fused AdamW runs, and its gradients are clipped."""
    import pytorch_lightning as pl

    from charlstm.app import build
    from charlstm.app.train import train

    norms = []

    class Norms(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):  # after the step, the clipped gradients are still there
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    cfg = make_cfg("trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0.001", "trainer.max_steps=3",
                   "model.optimizer=adamw", "logger=none", "sample.length=0", "callbacks.early_stopping=null",
                   "trainer.limit_val_batches=0")  # fmt: skip
    built = build.instantiate_named
    monkeypatch.setattr(build, "instantiate_named", lambda group: [*built(group), Norms()])
    _, objects = train(cfg)
    assert all(group["fused"] for group in objects.trainer.optimizers[0].param_groups)
    assert len(norms) == 3 and max(norms) <= 0.001 * 1.001
