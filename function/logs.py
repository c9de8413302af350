"""Structured log lines for the function's own messages: one JSON object per line on stdout, which Cloud
Logging parses into ``severity`` and ``message`` (and the Functions Framework passes through locally)."""

from __future__ import annotations

import json
import logging
import sys

LOGGER_NAME = "dagster_pipes_gcp"


class CloudLoggingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"severity": record.levelname, "message": record.getMessage(), "logger": record.name}
        if record.exc_info:
            entry["message"] += "\n" + self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_function_logging(level: int = logging.INFO) -> None:
    """Give the integration's logger a JSON handler, unless the application configured one already."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(CloudLoggingFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
