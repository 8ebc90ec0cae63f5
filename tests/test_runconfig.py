"""The config a run trains with is a new one: its settings fitted to the data and the machine, the caller's config
left as it was."""

from omegaconf import OmegaConf

from charlstm.app.runconfig import with_values
from charlstm.app.train import train


def test_with_values_sets_dotted_keys_on_a_copy(make_cfg):
    cfg = make_cfg()
    OmegaConf.set_struct(cfg, True)
    before = OmegaConf.to_yaml(cfg)
    new = with_values(cfg, {"trainer.precision": "32-true", "data.vocab": ["a", "b"], "paths.output_dir": "/x"})
    assert (new.trainer.precision, list(new.data.vocab), new.paths.output_dir) == ("32-true", ["a", "b"], "/x")
    assert OmegaConf.to_yaml(cfg) == before
    assert OmegaConf.is_struct(new)  # still refuses unknown keys


def test_train_leaves_the_callers_config_as_it_was(make_cfg):
    cfg = make_cfg("trainer.max_epochs=1", "trainer.precision=auto", "trainer.check_val_every_n_epoch=1",
                   "trainer.val_check_interval=100000", "trainer.log_every_n_steps=100000", "logger=none",
                   "sample.length=0")  # fmt: skip
    before, struct = OmegaConf.to_yaml(cfg), OmegaConf.is_struct(cfg)
    _, run = train(cfg)
    assert OmegaConf.to_yaml(cfg) == before and OmegaConf.is_struct(cfg) == struct
    # the run's own config has what it resolved: what config.yaml and HParams record
    n = run.trainer.num_training_batches
    assert run.cfg.trainer.precision in ("32-true", "bf16-mixed")
    assert run.cfg.trainer.val_check_interval == n and run.cfg.trainer.log_every_n_steps == n
    saved = OmegaConf.load(run.output_dir / "config.yaml")
    assert (saved.trainer.precision, saved.trainer.val_check_interval) == (run.cfg.trainer.precision, n)
