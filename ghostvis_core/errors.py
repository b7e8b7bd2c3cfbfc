"""User-facing errors.

A `GhostVisError` is something the user can fix (a bad flag, a missing file, a malformed record, a backend
request this machine cannot meet). The CLI prints its message as one line and exits non-zero, with no
traceback unless `--debug`. Internal invariants stay `assert`s: those are our bugs, not the user's.
"""


class GhostVisError(Exception):
    """An error the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(GhostVisError, ValueError):
    """A config field, flag or override has a value we cannot use."""


class DataError(GhostVisError, ValueError):
    """Input data is missing or malformed; the message names FILE:LINE."""


class BackendUnavailableError(GhostVisError, RuntimeError):
    """An explicitly requested backend cannot run on this machine."""


class CheckpointError(GhostVisError, RuntimeError):
    """A checkpoint is missing, truncated or corrupted."""


class TrainingAborted(GhostVisError, RuntimeError):
    """Training stopped for a reason the user must act on (NaN loss, out of memory)."""
