"""log_once: the one "say this once per process" helper."""

from __future__ import annotations

import logging

from ghostvis_core.log import get_logger, log_once, reset_log_once


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.levelno, record.getMessage()))


def test_log_once_logs_each_message_once():
    logger, records = get_logger(), _Records()
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    reset_log_once()
    try:
        assert log_once("decode: using SDPA") is True
        assert log_once("decode: using SDPA") is False
        assert log_once("another line", logging.WARNING) is True
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
        reset_log_once()
    assert records.seen == [(logging.INFO, "decode: using SDPA"), (logging.WARNING, "another line")]
