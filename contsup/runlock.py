"""One writer per run folder: an exclusive advisory lock held for the whole run.

`run_lock(folder)` takes `fcntl.flock` on `<folder>/.lock` (created if missing) and writes
who holds it (pid, host, since when) into that file. The kernel releases the lock when the
holder's process ends in any way, a crash or SIGKILL included, so a stale lock file never
blocks a rerun: only a live holder does. A second writer gets `RunFolderBusy`, a UsageError
whose one line names the holder (the CLI: exit 2), and has touched nothing but the lock file.

flock is advisory and per open file: it protects run folders from contsup processes on one
machine, and on network file systems that support it (NFSv4, Lustre with `flock`); where the
file system ignores flock the lock is a no-op, as it is for every tool that relies on it.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

LOCK_NAME = ".lock"


class RunFolderBusy(UsageError):
    """Another live process holds the run folder's lock. `holder` is what it wrote:
    {"pid", "host", "since"} (empty when it could not be read)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def read_holder(folder) -> dict:
    """What the lock file says of its last holder: pid, host, since (ISO time); {} if unknown."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    return {k: fields[k] for k in ("pid", "host", "since") if k in fields}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


@contextmanager
def run_lock(folder, blocking: bool = False):
    """Hold `<folder>/.lock` exclusively for the `with` block; `folder` is created if missing.
    Not blocking (the default): raise RunFolderBusy at once if another process holds it.
    Blocking: wait until it is free (used by a `reproduce` that waits for another one's run)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = read_holder(folder)
            raise RunFolderBusy(f"{folder} is in use by {describe_holder(holder)} (another contsup run "
                                f"writes it); wait for it to finish, or use another --out", holder) from None
        stamp = (f"pid={os.getpid()} host={socket.gethostname()} "
                 f"since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp, 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting writer)


def is_locked(folder) -> bool:
    """Whether a live process holds `folder`'s lock right now (a snapshot, for reporting)."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
