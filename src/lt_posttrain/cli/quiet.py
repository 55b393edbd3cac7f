"""What the command keeps off the screen: libraries' notes about themselves, which come before the run's own lines
and say nothing about the run. Applied by ``main()`` only: a program that imports lt_posttrain keeps every message.

Each entry names the library and the message, so that a new warning still shows; see ``tests/test_cli_output.py``.
"""

import logging
import os
import re
import sys
import warnings

# Deprecations inside the libraries we call: theirs to fix, not the user's (a deprecation in a recipe's own code is
# attributed to that code's module and still shows).
LIBRARIES = r"(lightning|lightning_fabric|torch|torchdata|torchao|transformers|datasets|deepspeed|peft|accelerate|jsonargparse)(\.|$)"

# logger name -> messages dropped (regular expressions, matched at the start)
LOG_MESSAGES = {
    # Lightning's advertisement, and the absence of hardware the run did not ask for
    "lightning.pytorch.utilities.rank_zero": [r"💡 Tip:", r"(TPU|HPU) available: False"],
    # DeepSpeed, imported by accelerate to unwrap a model at export, reports that it found no GPU on a CPU run
    "DeepSpeed": [r"Setting accelerator to CPU"],
    # torchao (imported by transformers when installed) cannot load its CUDA kernels on a CPU machine, and registers
    # enums in a way torch now deprecates
    "torchao": [r"Failed to load .*\.so"],
    "torch.utils._pytree": [r".* is an Enum subclass and is now natively supported"],
    # datasets' JSON reader logs its own parse error (row counted from 0) before raising; sources.load_rows turns
    # the exception into one line naming the file and line
    "datasets.packaged_modules.json.json": [r"Failed to load JSON from file"],
}


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{pattern})" for pattern in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_libraries(terminal: bool) -> None:
    """Drop the libraries' notes above for the rest of the process; without a ``terminal``, also the libraries'
    progress bars (a file receives each redraw, and a bad row's one-line error would come after a bar) and stdout's
    block buffering (lines appear as they are printed).

    Args:
        terminal: whether the output is a terminal.
    """
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    warnings.filterwarnings("ignore", message=r".* is deprecated", category=UserWarning, module=r"torchdata(\.|$)")
    # Lightning's caution about the length of an IterableDataset read by several workers: a streamed source's
    # micro-batches (data/streaming.py) tell Lightning the run's length, and are read by one worker at most
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # Lightning's note that it no longer installs TensorBoard, at every run without it (the CSV log is the default)
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed")
    for name, patterns in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(each, _DropMessages) for each in logger.filters):  # once, however often main() runs
            logger.addFilter(_DropMessages(patterns))
    if not terminal:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)

