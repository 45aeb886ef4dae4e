"""One place that sets up process logging for kvflow commands."""

from __future__ import annotations

import logging

from kvflow.runtime.config import log_levels_from_env

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once (a no-op when something already did)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=FORMAT)
    for name, named_level in log_levels_from_env().items():  # KVFLOW_LOG_LEVEL
        if isinstance(logging.getLevelName(named_level), int):
            logging.getLogger(name or None).setLevel(named_level)
