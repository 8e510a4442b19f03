"""Logging set-up for rule scripts: one log file per job, tracebacks included."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def to_file(path: str | os.PathLike | None, level: int = logging.INFO) -> None:
    """Send stdlib logging and ``sys.stderr`` (so tracebacks and progress bars) to ``path``.

    Called once by each rule script; library modules only call ``logging.getLogger(__name__)``.
    """
    handlers: list[logging.Handler] = []
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # open for the job's lifetime, line-buffered: a killed job keeps its log
        stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        sys.stderr = stream
        handlers.append(logging.StreamHandler(stream))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
    for noisy in ("urllib3", "filelock", "fsspec", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # PEFT (0.21) reads an attribute transformers 5.x deprecated when it wraps a model, once per trial
    # engine: nothing a user of this workflow can act on.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
