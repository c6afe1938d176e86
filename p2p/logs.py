"""Where output goes: people read one progress bar per long step and a summary line; framework logs
(Ray, transformers, warnings) go to a log file whose path the command prints, or to the terminal
with `--verbose`.

The choice is made once per command (`setup`) and carried to Ray's driver-side loggers and workers
through the environment (`P2P_VERBOSE`), so library code only asks `verbose()`.
"""

from __future__ import annotations

import logging
import os
import sys
import time

ENV = "P2P_VERBOSE"
FILE_ENV = "P2P_LOG_FILE"
DIR_ENV = "P2P_LOG_DIR"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose() -> bool:
    return os.environ.get(ENV, "1") == "1"  # library use (tests, notebooks): nothing is hidden


def log_dir() -> str:
    return os.environ.get(DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "p2p", "logs")


def setup(command: str, verbose_: bool) -> str | None:
    """Route framework logs for this process (and the Ray workers it starts); return the log file or None."""
    os.environ[ENV] = "1" if verbose_ else "0"
    root = logging.getLogger()
    if verbose_:
        logging.basicConfig(level=logging.INFO, format=FORMAT, stream=sys.stderr)
        return None
    os.makedirs(log_dir(), exist_ok=True)
    path = os.path.join(log_dir(), f"p2p-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    # Replace plain terminal handlers; keep others (pytest's capture handlers are subclasses).
    root.handlers = [h for h in root.handlers if type(h) is not logging.StreamHandler] + [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # deprecation warnings from the frameworks: in the file
    os.environ[FILE_ENV] = path
    # Model loading's bars (GGUF de-quantization, weights) are framework output too.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return path


def announce() -> None:
    """Say where the framework logs go, once, when the first framework starts (not before a
    command's one-line input errors)."""
    path = os.environ.get(FILE_ENV)
    if verbose() or not path or getattr(announce, "done", False):
        return
    announce.done = True
    print(f"p2p: framework logs -> {path} (--verbose shows them here)", file=sys.stderr, flush=True)


def to_file(*names: str) -> None:
    """Send loggers that installed their own terminal handlers (Ray's) to the log file instead."""
    path = os.environ.get(FILE_ENV)
    if verbose() or not path:
        return
    for name in names:
        logger = logging.getLogger(name)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.handlers = [handler]
        logger.propagate = False


def native_stderr_to_file() -> None:
    """Before starting a local Ray: what C++ code and child processes write to fd 2 goes to the log file.

    Ray's core worker, raylet and GCS log straight to the process's stderr, below Python's logging.
    Python-level writes (our progress bars and messages) keep the terminal through a duplicate of
    the original stderr. Done once per process, and only in quiet mode.
    """
    path = os.environ.get(FILE_ENV)
    if verbose() or not path or getattr(native_stderr_to_file, "done", False):
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1)
    native_stderr_to_file.done = True
