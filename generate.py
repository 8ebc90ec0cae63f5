"""python generate.py ckpt=PATH|last prompt="..." [key=value ...]: see configs/generate.yaml."""

import hydra
from omegaconf import DictConfig

from charlstm.generate import run


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
