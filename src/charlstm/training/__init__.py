"""The training layer: Lightning, on the data and core layers. The LightningModule, the DataModule, the
callbacks and the progress bar."""
