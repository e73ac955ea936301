"""Keep library chatter out of what the user reads: in this process, in Ray workers,
and in the lines Ray forwards from its workers and actors to the driver."""

from __future__ import annotations

import io
import logging
import os
import re
import sys

# Lines Ray, DeepSpeed and torch print that say nothing to someone training a model.
NOISE = re.compile("|".join([
    r"PlacementGroupCleaner",
    r"placement_group_cleaner\.py",
    r"PYTHON worker processes have been started",  # Tune starts a driver actor per trial: expected
    r"No CUDA runtime is found",
    r"Requesting resources: \{",
    # Ray Train's autoscaling client under a loaded CPU or a lost head: "safe to ignore", says Ray
    r"Failed to send resource request for",
    r"Attempting to start training worker group",
    r"^Started training worker group of size",
    r"^- \(ip=[\d.]+, pid=\d+\) world_rank=",
    r"generated new fontManager",
    r"To visualize your results with TensorBoard",
    r"core_worker\.cc",
    r"Setting accelerator to CPU",
    r"\[real_accelerator\.py",
    r"(Future|User|Deprecation)Warning",
    r"^\s*(\x1b\[\d+m)?\(\w+ pid=\d+(, ip=[\d.]+)?\)(\x1b\[0m)?\s*(return func\(|warnings\.warn\()",
    r"Token authentication is enabled",
    r"authentication token",
    r"shm_comm_op",
    r"Setting up process group for",
    r"Reporting training result",
    r"Progress bars disabled",
    r"streaming_executor\.py",
    r"Dataset \w+ execution finished",
    r"argument ``concurrency`` is deprecated",
    r"super\(\)\.__init__\(paths",
    r"gemm_4bit_forward from kernels-community",
    r"Writing model shards",
    r"^\s*self\.exclude_resources = ",  # the source line under a filtered Ray Data warning
    r"\[(INFO|WARNING)\] \[(config|engine|logging|comm|utils|stage_1_and_2|stage3|partition_parameters|"
    r"torch|builder)\.py",
]))

# Environment of Ray Train workers (set before they import torch and DeepSpeed).
WORKER_ENV = {
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning,ignore::DeprecationWarning",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Ray Train sends print() through its logger, which repeats lines; plain stdout reads better.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def quiet_ray_data() -> None:
    """Ray Data draws progress bars per dataset and per worker: unreadable in job logs."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_operator_progress_bars = False


def quiet_libraries() -> None:
    """Keep library chatter (progress bars of HF saves, advisory warnings) out of the user's view.

    Cheap: the libraries read these settings when they are imported, so the CLI can call this
    before it imports any of them (a mistake in a config is then reported in well under a second)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("bitsandbytes", "DeepSpeed", "torch.distributed"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        # A library may set its logger's level again when it makes it (DeepSpeed's does, and warns
        # at import, in local mode too): a filter outlives that.
        if errors_only not in logger.filters:
            logger.addFilter(errors_only)
    if "transformers" in sys.modules:  # imported already: its verbosity was read at import
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def without_libraries(names: list[str]) -> None:
    """Let no library import these (an engine's that this process does not run: e.g. local mode
    and DeepSpeed's). accelerate (which PEFT and transformers use) imports DeepSpeed whenever it
    is installed, which costs seconds and prints its accelerator warning in a run that uses no
    DeepSpeed. A None in sys.modules is Python's own way of saying a module is absent: find_spec
    answers None and an import raises ImportError, so each library takes its path without it.
    Call before the training stack is imported."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None


# A traceback that follows a noise line (Ray logs some of its clean-up failures with one).
TRACEBACK_LINE = re.compile(r"^(\S*\(\w+ pid=\d+[^)]*\)\S* )?(Traceback|\s|[\w.]+(Error|Exception)\b)")


class NoiseFilter(io.TextIOBase):
    """A stream that passes whole lines on to `target` unless they are noise."""

    def __init__(self, target):
        self.target, self.pending, self.in_noise = target, "", False

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.in_noise = bool(NOISE.search(line)) or (self.in_noise and bool(TRACEBACK_LINE.match(line)))
            if not self.in_noise:
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not NOISE.search(self.pending):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()


class NoiseLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISE.search(record.getMessage())


def filter_driver_streams() -> None:
    """Ray prints forwarded worker lines through sys.stdout / sys.stderr, and its own
    driver-side warnings through the "ray" logger's handlers: filter all of them."""
    if not isinstance(sys.stdout, NoiseFilter):
        sys.stdout = NoiseFilter(sys.stdout)
    if not isinstance(sys.stderr, NoiseFilter):
        sys.stderr = NoiseFilter(sys.stderr)
    for logger in (logging.getLogger("ray"), logging.getLogger()):
        for handler in logger.handlers:
            if not any(isinstance(f, NoiseLogFilter) for f in handler.filters):
                handler.addFilter(NoiseLogFilter())
