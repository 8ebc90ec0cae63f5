"""The time-budget schedule: warm-up and cosine decay follow training seconds (validation excluded), checked with a
fake clock; a run bounded by steps keeps the step schedule; the elapsed training time travels in the checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from charlstm.training.model import CLOCK_KEY, TrainClock, lr_factor, time_factor


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cosine(p: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def test_time_factor_warms_up_then_decays_to_the_floor():
    assert time_factor(0.01, 0.02, 0.05, True) == pytest.approx(0.5)
    assert time_factor(0.02, 0.02, 0.05, True) == pytest.approx(1.0)
    assert time_factor(0.51, 0.02, 0.05, True) == pytest.approx(cosine(0.5, 0.05))
    assert time_factor(1.0, 0.02, 0.05, True) == pytest.approx(0.05)
    assert time_factor(0.7, 0.0, 0.05, False) == 1.0


def test_validation_pauses_the_clock_and_the_budget_ends_at_the_floor():
    fake = FakeClock()
    clock = TrainClock(budget=10.0, clock=fake)
    clock.resume_training(wall_elapsed=0.0)
    fake.now += 3.0  # 3 s of training
    assert clock.elapsed() == pytest.approx(3.0)
    assert clock.progress() == pytest.approx(0.3)  # no validation yet: the whole budget is training
    clock.pause()  # validation: 1 s that the schedule does not count
    fake.now += 1.0
    assert clock.elapsed() == pytest.approx(3.0)
    # training resumes 4 s into the budget: 3/4 of wall time trains, so the budget holds 7.5 training seconds
    clock.resume_training(wall_elapsed=4.0)
    assert clock.horizon == pytest.approx(7.5)
    assert clock.progress() == pytest.approx(3.0 / 7.5)
    fake.now += 4.5  # the rest of the budget's training time: the run ends annealed
    assert clock.elapsed() == pytest.approx(7.5)
    assert clock.factor(0.02, 0.05, True) == pytest.approx(0.05)
    fake.now += 1.0  # a step past the projection stays at the floor
    assert clock.factor(0.02, 0.05, True) == pytest.approx(0.05)


def test_learning_rate_is_a_function_of_training_seconds_only():
    fake = FakeClock()
    a, b = TrainClock(20.0, fake), TrainClock(20.0, fake)
    a.resume_training(), b.resume_training()
    fake.now += 5.0
    b.pause()
    b_factor = b.factor(0.1, 0.0, True)
    fake.now += 7.0  # b validates for 7 s: its learning rate does not move
    assert b.factor(0.1, 0.0, True) == b_factor
    assert a.factor(0.1, 0.0, True) < b_factor


def test_a_step_limit_that_comes_first_drives_the_schedule():
    fake = FakeClock()
    clock = TrainClock(600.0, fake)
    clock.resume_training()
    fake.now += 6.0  # 1% of the time budget, but 100 of 100 steps
    assert clock.factor(0.0, 0.1, True, step=100, total_steps=100) == pytest.approx(0.1)
    assert clock.factor(0.0, 0.1, True, step=50, total_steps=100) == pytest.approx(cosine(0.5, 0.1))


def test_warmup_steps_ramp_without_a_fraction():
    clock = TrainClock(60.0, FakeClock())
    assert clock.factor(0.0, 0.0, True, step=4, warmup_steps=10) == pytest.approx(0.5)
    assert clock.factor(0.0, 0.0, True, step=20, warmup_steps=10) == pytest.approx(1.0)


def test_clock_state_is_primitive_and_resumes_from_the_saved_time(tmp_path):
    fake = FakeClock()
    clock = TrainClock(10.0, fake)
    clock.resume_training()
    fake.now += 4.0
    path = tmp_path / "c.ckpt"
    torch.save({CLOCK_KEY: clock.state_dict()}, path)
    state = torch.load(path, weights_only=True)[CLOCK_KEY]
    resumed = TrainClock(10.0, fake)
    resumed.load_state_dict(state)
    assert resumed.elapsed() == pytest.approx(4.0)
    resumed.resume_training(wall_elapsed=5.0)  # the budget's wall clock also resumes (Lightning's Timer)
    fake.now += 2.0
    assert resumed.elapsed() == pytest.approx(6.0)
    assert resumed.progress() == pytest.approx(6.0 / 8.0)


def test_the_schedule_reads_the_clock_once_per_step():
    class Ticking(FakeClock):
        def __call__(self) -> float:
            self.now += 0.01  # time passes between LambdaLR's questions for each parameter group
            return self.now

    clock = TrainClock(10.0, Ticking())
    clock.resume_training()
    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [p[0]]}, {"params": [p[1]], "weight_decay": 0.0}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, clock.schedule(0.5, 0.05, True))
    rates = []
    for _ in range(5):
        opt.step()
        sched.step()
        lrs = [group["lr"] for group in opt.param_groups]
        assert lrs[0] == lrs[1]  # one reading per step: the groups share one rate
        rates.append(lrs[0])
    assert rates == sorted(rates) and rates[0] < rates[-1]  # and it follows the clock from step to step


def test_step_schedule_is_unchanged():
    assert lr_factor(0, 100, 10, 0.0, True) == pytest.approx(0.1)
    assert lr_factor(100, 100, 10, 0.1, True) == pytest.approx(0.1)


def test_time_bounded_run_uses_the_time_schedule_and_saves_its_clock(make_cfg, tmp_path):
    from charlstm.app.train import train
    from charlstm.core import checkpoint

    cfg = make_cfg("model.scheduler=cosine", "model.warmup_fraction=0.1", "trainer.max_time=00:00:01:00",
                   "trainer.max_epochs=1", "trainer.max_steps=-1", "logger=none")  # fmt: skip
    _, objects = train(cfg)
    model = objects.model
    assert model.clock is not None and model.clock.elapsed() > 0
    # one epoch ended the run long before the minute: the step bound drove the schedule to its floor
    lr = objects.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(cfg.model.lr * cfg.model.min_lr_ratio, abs=cfg.model.lr * 0.05)
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert saved[CLOCK_KEY]["train_s"] > 0


def test_step_bounded_run_keeps_the_step_schedule(make_cfg):
    from charlstm.app.train import train

    cfg = make_cfg("model.scheduler=cosine", "model.warmup_steps=2", "trainer.max_steps=6", "logger=none",
                   "trainer.limit_val_batches=0", "callbacks.early_stopping=null", "trainer.max_epochs=-1")  # fmt: skip
    _, objects = train(cfg)
    assert objects.model.clock.budget is None  # no time budget: the clock only measures the training time


def test_resume_continues_the_schedule_from_the_saved_training_time(make_cfg, tmp_path):
    from charlstm.app.train import train

    quiet = ("model.scheduler=cosine", "trainer.max_time=00:00:10:00", "logger=none", "trainer.limit_val_batches=0",
             "callbacks.early_stopping=null", "trainer.max_epochs=-1")  # fmt: skip
    train(make_cfg(*quiet, "trainer.max_steps=3"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt[CLOCK_KEY] = {"train_s": 500.0, "horizon": 550.0}  # as if 500 of a 550-s horizon had been trained
    torch.save(ckpt, last)
    _, objects = train(make_cfg(*quiet, "trainer.max_steps=5", f"ckpt_path={last}"))
    clock = objects.model.clock
    assert clock.elapsed() >= 500.0
    lr = objects.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr <= cosine(500.0 / 550.0, 0.0) * cfg_lr(objects) + 1e-9  # past 90% of the run, not back at the start


def cfg_lr(objects) -> float:
    return float(objects.cfg.model.lr)
