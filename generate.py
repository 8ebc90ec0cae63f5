"""python generate.py ckpt=PATH|last prompt="..." [key=value ...]: see configs/generate.yaml."""

from pathlib import Path

from charlstm.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry(Path(__file__).resolve().parent / "configs", "generate", "charlstm.generate:run", plain=True)
