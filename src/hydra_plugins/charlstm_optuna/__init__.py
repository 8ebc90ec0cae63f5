"""Hydra sweeper plugin running charlstm's Optuna search (hydra/sweeper=charlstm_optuna)."""
