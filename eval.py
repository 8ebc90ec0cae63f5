"""python eval.py ckpt=PATH|last [data=file data.path=X] [key=value ...]: see configs/eval.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from charlstm.evaluate import run  # imported here so `python eval.py --help` answers at once

    return run(cfg)


if __name__ == "__main__":
    main()
