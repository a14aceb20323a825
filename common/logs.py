"""One log format for every stage: `HH:MM:SS stage3 INFO message`, to stderr, rank 0 only for training lines.

    from common.logs import get_logger, setup_logging
    log = get_logger("stage2")          # a child of the project's "eagle3" logger
    setup_logging()                     # once, in the entry point (idempotent); other ranks log warnings only

Progress bars (tqdm) stay on stderr beside it; result tables that a user copies go to stdout with `print`.
"""
from __future__ import annotations

import logging
import os
import sys

ROOT = "eagle3"
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def get_logger(name: str) -> logging.Logger:
    """`eagle3.<name>`; shown as `<name>` in the log lines."""
    return logging.getLogger(f"{ROOT}.{name}")


class _ShortName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.name = record.name.removeprefix(ROOT + ".")
        return True


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """Give every handler of the root logger the project's format (adding a stderr handler when there is none:
    entry points without Hydra); Hydra's console and job-log handlers keep working, in this format. The project's
    logger logs `level` on rank 0 and warnings only on the other ranks. Idempotent."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        if not any(isinstance(f, _ShortName) for f in handler.filters):
            handler.addFilter(_ShortName())
    logging.getLogger(ROOT).setLevel(level if rank == 0 else logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
