"""One trainer per run folder: an exclusive `run.lock` held by rank 0 for the life of the trainer.

The lock file is created whole or not at all: its JSON (pid, host, since, command) is written to a temporary
sibling and hard-linked into place, and link() fails when the name exists, so two launches can never both
hold it (also across hosts on a shared filesystem). A holder that died without releasing it (SIGKILL, the OOM
killer, a power cut) leaves a stale lock: on the holder's own host its pid is no longer running, and the next
launch takes it over with a log line. A lock from another host cannot be checked from here; the message says
how to remove it by hand. Takeovers on one host are serialised by flock() on the run folder, so two launches
that both find the same stale lock cannot both take it.

Every rank of a launch shares rank 0's lock; only the global rank 0 touches the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ghostvis_core.errors import ConfigError, GhostVisError
from ghostvis_core.log import get_logger

LOCK_NAME = "run.lock"


class RunLockedError(GhostVisError):
    """Another trainer holds the run folder."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run lock, as its file says."""

    pid: int
    host: str
    since: float
    """Unix time the lock was taken."""
    command: str

    def describe(self) -> str:
        """'pid 123 on host h since 2026-01-02 10:11:12 UTC'."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"pid {self.pid} on host {self.host} since {when}"

    def is_stale(self) -> bool:
        """True when the holder ran on this host and its pid is gone (another host's lock is never stale)."""
        return self.host == socket.gethostname() and not pid_alive(self.pid)


def lock_path(run_dir: Path) -> Path:
    """RUN_DIR/run.lock."""
    return Path(run_dir) / LOCK_NAME


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (signal 0 checks without sending anything). A zombie
    (exited, not yet reaped: a SIGKILLed torchrun worker whose parent died too) holds nothing: not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS) or it exited just now: the signal check above stands
    # /proc/PID/stat is "pid (comm) STATE ...", and comm may hold spaces or parentheses: split after the last ")"
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def read_holder(run_dir: Path) -> LockHolder | None:
    """The holder recorded in RUN_DIR/run.lock, or None without a lock; a damaged file is a RunLockedError."""
    path = lock_path(run_dir)
    try:
        data = json.loads(path.read_text("utf-8"))
        return LockHolder(pid=int(data["pid"]), host=str(data["host"]), since=float(data["since"]),
                          command=str(data.get("command", "")))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RunLockedError(
            f"{path} is not a readable run lock ({type(e).__name__}: {e}); if no trainer uses run folder "
            f"{Path(run_dir)}, delete {path} and launch again"
        ) from None


def locked_message(run_dir: Path, holder: LockHolder) -> str:
    """The one line for a launch that finds the run held."""
    path = lock_path(run_dir)
    fix = (f"wait for it to finish, stop it (kill -INT {holder.pid} saves a checkpoint), or train under "
           "another --run NAME")
    if holder.host != socket.gethostname():
        fix += f"; if that process is gone, delete {path} on any host"
    return f"run folder {Path(run_dir)} is in use by another trainer ({holder.describe()}; lock {path}): {fix}"


def check_unlocked(run_dir: Path) -> None:
    """RunLockedError when a live trainer holds `run_dir` (the launcher's early check; creates nothing)."""
    holder = read_holder(run_dir)
    if holder is not None and not holder.is_stale():
        raise RunLockedError(locked_message(run_dir, holder))


def _created_chain(folder: Path) -> list[Path]:
    """The folders that mkdir(parents=True) on `folder` would create, deepest first."""
    chain = []
    path = Path(folder).absolute()
    while not path.exists():
        chain.append(path)
        path = path.parent
    return chain


def remove_if_empty(folders: list[Path]) -> None:
    """rmdir each folder (deepest first) that holds nothing: what a refused launch created goes again."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@contextlib.contextmanager
def _folder_flock(run_dir: Path) -> Iterator[None]:
    """flock() on the run folder itself (no file left behind) while one launch checks and takes the lock."""
    if os.name != "posix":
        yield
        return
    import fcntl

    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def acquire(run_dir: Path) -> LockHolder:
    """Take RUN_DIR/run.lock for this process (creating the folder); RunLockedError naming a live holder."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {run_dir} ({e.strerror}): fix its permissions or pick "
                          "another runs folder (GHOSTVIS_HOME / runs_root)") from None
    me = LockHolder(pid=os.getpid(), host=socket.gethostname(), since=time.time(), command=" ".join(sys.argv))
    path = lock_path(run_dir)
    tmp = run_dir / f".{LOCK_NAME}.tmp-{me.pid}"
    with _folder_flock(run_dir):
        tmp.write_text(json.dumps({"pid": me.pid, "host": me.host, "since": me.since, "command": me.command}))
        try:
            os.link(tmp, path)
        except FileExistsError:
            holder = read_holder(run_dir)
            if holder is not None and not holder.is_stale():
                tmp.unlink()
                raise RunLockedError(locked_message(run_dir, holder)) from None
            if holder is not None:
                get_logger().warning(f"Taking over the stale lock {path}: its holder ({holder.describe()}) is no "
                                     "longer running")
            os.replace(tmp, path)
        else:
            tmp.unlink()
    return me


def release(run_dir: Path, me: LockHolder) -> None:
    """Remove RUN_DIR/run.lock if it is still ours (a lock taken over by another launch is left alone)."""
    holder = read_holder(run_dir)
    if holder is not None and (holder.pid, holder.host, holder.since) == (me.pid, me.host, me.since):
        lock_path(run_dir).unlink()


@contextlib.contextmanager
def hold(run_dir: Path, is_main: bool, share=None) -> Iterator[None]:
    """Hold the run lock for the body (rank 0 takes it; `share(obj)` gives rank 0's outcome to every rank).

    Folders the lock had to create are removed again on the way out when nothing was written into them, so a
    refused launch leaves no stub run folder.
    """
    created = _created_chain(run_dir) if is_main else []
    me, refusal = None, None
    if is_main:
        try:
            me = acquire(run_dir)
        except GhostVisError as e:
            refusal = e
            remove_if_empty(created)
    message = share(None if refusal is None else str(refusal)) if share is not None else None
    if refusal is not None:
        raise refusal
    if message is not None:
        raise RunLockedError("rank 0 could not take the run lock (its message above says why)")
    try:
        yield
    finally:
        if me is not None:
            release(run_dir, me)
            remove_if_empty(created)
