"""The run's console and train.log: known-harmless library chatter dropped narrowly (by message and origin),
and lines that belong in the log file only (validations under a live progress bar, error lines already
printed) kept off the console."""

from __future__ import annotations

import logging
import warnings

from charlstm.core.errors import process_rank

# (logger name prefix, message start) of INFO lines libraries print on every run that say nothing to the user
_CHATTER = (
    ("pytorch_lightning", "💡 Tip: For seamless cloud logging"),
    ("lightning_fabric", "💡 Tip: For seamless cloud logging"),
)
# Lightning's device inventory (the run's accelerator is in the config) and its notes on loading a checkpoint (the
# run says what it resumed or scored): kept in train.log, off the console
_FILE_ONLY_PREFIXES = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "IPU available:",
    "LOCAL_RANK: ",  # the CUDA devices a process sees, one line per process
    "Restoring states from the checkpoint path at",
    "Loaded model weights from the checkpoint at",
    # the precision plugin's announcement: the run's own start lines already say which precision and why
    "Using bfloat16 Automatic Mixed Precision",
    "Using 16bit Automatic Mixed Precision",
    # why the fit loop stopped, and the Timer's note that max_time is up: the run's end lines say where it stopped
    "`Trainer.fit` stopped:",
    "Time limit reached.",
    # said while the lr schedule sizes itself from the training batches (model.py, estimated_stepping_batches)
    "Loading `train_dataloader` to estimate number of stepping batches",
    # DDP's set-up banners (one per process, then a framed one): the model line says how many processes train
    "Initializing distributed:",
    "-" * 100 + "\ndistributed_backend=",
)
# the libraries whose lines above are kept off the console
_FILE_ONLY_LOGGERS = ("pytorch_lightning", "lightning_fabric")


class Chatter(logging.Filter):
    """Drops the known library chatter lines everywhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        msg = str(record.msg)
        return not any(record.name.startswith(name) and msg.startswith(start) for name, start in _CHATTER)


class ConsoleLines(logging.Filter):
    """Keeps lines marked ``extra={"file_only": True}`` (and Lightning's lines listed above) off the console, and
    the info lines of every process but the first of a multi-process run (each would print the same start lines
    again; their warnings and errors still show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if record.levelno <= logging.INFO and process_rank() > 0:
            return False
        return not (record.name.startswith(_FILE_ONLY_LOGGERS) and str(record.msg).startswith(_FILE_ONLY_PREFIXES))


def route_library_logs() -> None:
    """Let Lightning's loggers reach the run's handlers (console + train.log) instead of their own stream
    handler, which Lightning adds when it is imported before logging is configured.

    A log line that cannot be written (train.log on a full disk) is dropped instead of printing a traceback for
    every line (logging's own switch): the write that matters, a checkpoint's, says so in one line.
    """
    root = logging.getLogger()
    if not root.handlers:
        return
    logging.raiseExceptions = False
    for name in ("pytorch_lightning", "lightning_fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def quiet_known_warnings() -> None:
    """Warnings that are harmless for this project, each matched by its text and the module that issues it."""
    # Lightning's own use of a torch pytree API it has not migrated yet
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", module=r"pytorch_lightning\."
    )
    # StreamDataset defines __len__ for the progress bar and is always read by one process (num_workers=0)
    warnings.filterwarnings(
        "ignore", message=r"Your `IterableDataset` has `__len__` defined", module=r"pytorch_lightning\."
    )
    # Under DDP: val/* and test/* are logged after CharLSTMModule sums the loss and char count of every rank (each
    # scores its own share of the windows), so each rank logs the whole text's numbers already; train/* are
    # each rank's own batches, an unbiased sample of the same loss, and syncing them would add two collective calls
    # to every training step
    warnings.filterwarnings(
        "ignore",
        message=r"It is recommended to use `self\.log\('(val|test|train)/\w+', \.\.\., sync_dist=True\)`",
        module=r"pytorch_lightning\.",
    )
    # debug=overfit trains on its first batches in order: Lightning says it turns shuffling off, which is the point
    warnings.filterwarnings(
        "ignore",
        message=r"You requested to overfit but enabled train dataloader shuffling",
        module=r"pytorch_lightning\.",
    )
    # oneDNN's note about TF32 on Intel GPUs, printed once on CPUs where it cannot apply
    warnings.filterwarnings("ignore", message=r".*TF32 acceleration on top of oneDNN", category=UserWarning)
