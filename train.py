"""python train.py [key=value ...] [-m for sweeps]: see configs/train.yaml."""

from pathlib import Path

from charlstm.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry(Path(__file__).resolve().parent / "configs", "train", "charlstm.train:run")
