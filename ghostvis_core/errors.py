"""User-facing errors.

A `GhostVisError` is something the user can fix (a bad flag, a missing file, a malformed record, a backend
request this machine cannot meet). The CLI prints its message as one line and exits non-zero, with no
traceback unless `--debug`. Internal invariants stay `assert`s: those are our bugs, not the user's.
"""

import difflib


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


def closest_match(name: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate closest to a mistyped `name`, or None.

    A dotted key whose whole name matches nothing is tried by its last part ("lr" -> "optim.lr").
    """
    candidates = [str(c) for c in candidates]
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=cutoff)
    if matches:
        return matches[0]
    tail = name.rsplit(".", 1)[-1]
    tails = {c.rsplit(".", 1)[-1]: c for c in candidates if "." in c}
    close = difflib.get_close_matches(tail, list(tails), n=1, cutoff=max(cutoff, 0.75))
    return tails[close[0]] if close else None


def did_you_mean(name: str, candidates, cutoff: float = 0.6) -> str:
    """"; did you mean 'x'?" for the closest candidate, or "" (appended to an error message)."""
    match = closest_match(name, candidates, cutoff)
    return f"; did you mean {match!r}?" if match else ""
