"""The application layer: Hydra entry points on every layer below. train/generate/evaluate commands, config
checks, run and sweep folders, search, summaries, cluster jobs, fault handling and the console."""
