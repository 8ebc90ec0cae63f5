"""charlstm: character-level stacked LSTMs trained with PyTorch Lightning and configured with Hydra."""

__version__ = "0.1.0"
