"""One writer per run folder: an exclusive advisory lock held for the whole run.

`run_lock(folder)` takes `fcntl.flock` on `<folder>/.lock` (created if missing) and writes
who holds it (pid, host, since when) into that file. The kernel releases the lock when the
holder's process ends in any way, a crash or SIGKILL included, so a stale lock file never
blocks a rerun: only a live holder does. A second writer gets `RunFolderBusy`, a UsageError
whose one line names the holder (the CLI: exit 2), and has touched nothing. A block that
fails leaves no trace of the lock: the lock file and the folders that `run_lock` created
for it are removed (a refused `train` into a new --out leaves no empty folder). Removing a
lock file is safe because every taker checks, once it holds the lock, that the file it
locked is still the one at `<folder>/.lock`, and locks the new one otherwise.

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
    Blocking: wait until it is free (used by a `reproduce` that waits for another one's run).
    If the block raises, the lock file and the folders created for it are removed."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    made = [p for p in (folder, *folder.parents) if not p.exists()]   # innermost first
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        made_file = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(folder)
            raise RunFolderBusy(f"{folder} is in use by {describe_holder(holder)} (another contsup run "
                                f"writes it); wait for it to finish, or use another --out", holder) from None
        except BaseException:
            os.close(fd)
            raise
        if _is_file_at(fd, path):
            break
        os.close(fd)   # its holder removed it while we waited: lock the file there now
    try:
        stamp = (f"pid={os.getpid()} host={socket.gethostname()} "
                 f"since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp, 0)
        yield
    except BaseException:
        if made_file:   # still held: a waiter sees the file gone and locks a new one
            path.unlink(missing_ok=True)
            for p in made:   # innermost first; one that is not empty stays, and so do its parents
                try:
                    p.rmdir()
                except OSError:
                    break
        raise
    finally:
        os.close(fd)  # releases the lock; the file stays after a block that ended well


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is the one `path` names now."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


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
