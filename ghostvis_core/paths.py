"""Where runs, data and caches live: platformdirs, overridable with GHOSTVIS_HOME."""

import os
from pathlib import Path

import platformdirs

APP_NAME = "ghostvis"


def ghostvis_home() -> Path | None:
    """The GHOSTVIS_HOME override, if set: everything then lives under it."""
    value = os.environ.get("GHOSTVIS_HOME")
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """Persistent data: runs, generated corpora, tokenizers."""
    home = ghostvis_home()
    return home if home else Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    """Disposable caches (compiled kernels, probes)."""
    home = ghostvis_home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP_NAME))


def runs_dir() -> Path:
    """Training runs: one folder per `--run NAME`."""
    return data_dir() / "runs"


def datasets_dir() -> Path:
    """Generated and imported datasets (the embedded default corpus is written here at first use)."""
    return data_dir() / "datasets"
