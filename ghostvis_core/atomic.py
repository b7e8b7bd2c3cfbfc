"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Every writer writes a temporary sibling in the same folder (same filesystem, so the rename is atomic),
fsyncs it, renames it over the target with os.replace and fsyncs the folder so the rename survives a power
loss. On any error the temporary is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    """fsync a file that is already closed (e.g. written by a library that takes a path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and new entries in it survive a power loss (no-op where unsupported)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it is fsynced and renamed over `path`.

    For tools that write a file themselves (`fig.savefig(tmp)`, `torch.save(obj, tmp)`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block or the rename failed
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write `obj` as JSON (plus a final newline) to `path` atomically; returns path."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def replace_dir_atomic(tmp_dir: Path, final_dir: Path, *, keep_existing: bool = False) -> bool:
    """Rename the finished folder `tmp_dir` to `final_dir` and fsync the parent; True when tmp_dir was published.

    A `final_dir` that exists with content is either replaced (moved aside to `.old_NAME-PID`, deleted after
    the rename, so `final_dir` is never half old and half new) or, with keep_existing, kept: `tmp_dir` is
    deleted and False returned. The latter is for caches several processes may fill at once with identical
    content: the first rename wins and readers of the winner are never disturbed.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    fsync_dir(tmp_dir)
    aside = None
    if final_dir.exists() and any(final_dir.iterdir()):
        if keep_existing:
            shutil.rmtree(tmp_dir)
            return False
        aside = final_dir.with_name(f".old_{final_dir.name}-{os.getpid()}")
        os.rename(final_dir, aside)
    try:
        os.replace(tmp_dir, final_dir)  # over a missing or empty folder
    except OSError:
        # another process published a non-empty folder between the check and the rename
        if not keep_existing or not (final_dir.exists() and any(final_dir.iterdir())):
            raise
        shutil.rmtree(tmp_dir)
        return False
    fsync_dir(final_dir.parent)
    if aside is not None:
        shutil.rmtree(aside)
    return True


@contextlib.contextmanager
def atomic_dir(final_dir: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a private temporary folder next to `final_dir`; on success it replaces it (replace_dir_atomic).

    Whatever the block leaves behind on an error is deleted; `final_dir` is then untouched.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        yield tmp
        replace_dir_atomic(tmp, final_dir, keep_existing=keep_existing)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
