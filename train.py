"""python train.py [key=value ...] [-m for sweeps]: see configs/train.yaml."""

import hydra
from omegaconf import DictConfig

from charlstm.train import run


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
