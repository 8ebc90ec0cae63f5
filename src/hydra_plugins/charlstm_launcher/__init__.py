"""charlstm's Hydra launchers (hydra/launcher=submitit_slurm, submitit_local): Hydra accepts launchers only from
the hydra_plugins namespace, where it finds them at start-up."""
