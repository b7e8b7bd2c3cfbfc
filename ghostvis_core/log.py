"""One logger for the library; rank-aware so torchrun workers don't print N copies."""

import logging
import os

_LOGGER_NAME = "ghostvis"


def get_logger() -> logging.Logger:
    """The library logger; handlers are configured by the CLI or by `setup_logging`."""
    return logging.getLogger(_LOGGER_NAME)


def is_rank_zero() -> bool:
    """True on the process that should print (rank 0 under torchrun, or a plain process)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(level: int = logging.INFO) -> None:
    """Plain stderr logging for recipes run under torchrun; only rank 0 logs at INFO."""
    logger = get_logger()
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level if is_rank_zero() else logging.WARNING)
    logger.propagate = False


_LOGGED_ONCE: set[str] = set()


def first_time(key: str) -> bool:
    """True the first time this process asks for `key`, False after: the one "only once" memo."""
    if key in _LOGGED_ONCE:
        return False
    _LOGGED_ONCE.add(key)
    return True


def log_once(msg: str, level: int = logging.INFO) -> bool:
    """Log `msg` the first time this process asks for it (later identical calls are silent); True if logged."""
    if not first_time(msg):
        return False
    get_logger().log(level, msg)
    return True


def reset_log_once() -> None:
    """Forget what log_once printed (tests that assert on a once-per-process line)."""
    _LOGGED_ONCE.clear()
