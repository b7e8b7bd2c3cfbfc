"""log_once: the one "say this once per process" helper."""

from __future__ import annotations

import logging

from ghostvis_core.log import log_once, reset_log_once


def test_log_once_logs_each_message_once(caplog):
    reset_log_once()
    logger = logging.getLogger("ghostvis")
    propagate = logger.propagate
    logger.propagate = True  # setup_logging may have turned it off; caplog listens on the root logger
    try:
        with caplog.at_level(logging.INFO, logger="ghostvis"):
            assert log_once("decode: using SDPA") is True
            assert log_once("decode: using SDPA") is False
            assert log_once("another line", logging.WARNING) is True
    finally:
        logger.propagate = propagate
        reset_log_once()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "decode: using SDPA"), (logging.WARNING, "another line")]
