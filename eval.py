"""python eval.py ckpt=PATH|last [data=file data.path=X] [key=value ...]: see configs/eval.yaml."""

from pathlib import Path

from charlstm.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry(Path(__file__).resolve().parent / "configs", "eval", "charlstm.evaluate:run")
