"""Logging used by every module: rank-aware (rank 0 prints unless asked), one format."""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "side4video"


def process_rank() -> int:
    """This process's global rank from whichever launcher started it (0 when alone)."""
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _RankFilter(logging.Filter):
    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        # Warnings and errors always pass: a failing rank must be able to say why.
        return self.all_ranks or record.levelno >= logging.WARNING or process_rank() == 0


def setup_logging(level: str = "info", all_ranks: bool = False) -> logging.Logger:
    """Configure the package logger once per process (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    rank = process_rank()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter(all_ranks))
    logger.addHandler(handler)
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """Child logger of the package logger, e.g. get_logger(__name__)."""
    return logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")
