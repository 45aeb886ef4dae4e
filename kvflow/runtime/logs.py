"""One place that sets up process logging for kvflow commands."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once (a no-op when something already did)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=FORMAT)
