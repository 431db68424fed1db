"""One writer per folder, across threads and processes, with a bounded wait that names the holder.

A threading lock (threads of this process) plus an OS file lock on <folder>/.lock (other processes:
fcntl.flock, msvcrt.locking on Windows). The holder writes its pid into the lock file, so a writer that
gives up can say who holds it, and whether that process is stopped (SIGSTOP, a debugger). The OS drops
the file lock of a process that dies, so a killed holder never blocks anyone.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time

LOCK_FILE = ".lock"
WAIT_ENV = "WEGEN_LOCK_WAIT"  # seconds a change waits for a busy folder (default DEFAULT_WAIT)
DEFAULT_WAIT = 30.0
_POLL = 0.05

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


class BusyError(ValueError):
    """The folder is locked by another writer (after the wait)."""


def lock_wait() -> float:
    """Seconds to wait for a busy lock: $WEGEN_LOCK_WAIT, else 30."""
    text = os.environ.get(WAIT_ENV, "").strip()
    if not text:
        return DEFAULT_WAIT
    try:
        wait = float(text)
    except ValueError:
        wait = -1.0
    if not (math.isfinite(wait) and wait >= 0):
        raise ValueError(f"{WAIT_ENV} must be a finite number of seconds >= 0, got {text!r}")
    return wait


@contextlib.contextmanager
def folder_lock(folder: str, what: str, wait: float | None = None, error: type = BusyError):
    """Hold `folder` (which must exist) for one change. Not re-entrant. When busy, waits up to `wait` seconds
    (None: lock_wait(); 0: not at all), then raises `error` naming `what` and the holder's pid."""
    wait = lock_wait() if wait is None else wait
    deadline = time.monotonic() + wait
    path = os.path.join(folder, LOCK_FILE)
    with _THREAD_LOCKS_GUARD:
        tlock = _THREAD_LOCKS.setdefault(os.path.realpath(folder), threading.Lock())
    if not (tlock.acquire(timeout=wait) if wait > 0 else tlock.acquire(False)):
        raise error(_busy(what, path, wait))
    try:
        with open(path, "a+b") as f:
            if not _lock_file(f, deadline):
                raise error(_busy(what, path, wait))
            try:
                with contextlib.suppress(OSError):  # the pid is only for the message of a waiting writer
                    f.seek(0)
                    f.truncate()
                    f.write(f"{os.getpid()}\n".encode())
                    f.flush()
                yield folder
            finally:
                _unlock_file(f)
    finally:
        tlock.release()


def _busy(what: str, path: str, wait: float) -> str:
    pid = None
    with contextlib.suppress(OSError, ValueError):
        with open(path, "rb") as f:
            pid = int(f.read(32).strip() or b"x")
    if pid is None:
        holder = "another writer holds its lock"
    elif pid == os.getpid():
        holder = f"another thread of this process (pid {pid}) holds its lock"
    else:
        holder = f"process {pid}{' (stopped)' if _stopped(pid) else ''} holds its lock"
    waited = f" and did not let go within {wait:g} s" if wait > 0 else ""
    return (f"{what} is busy: {holder} ({path}){waited}; try again when it finishes, or end that "
                     f"process ({WAIT_ENV} sets the wait in seconds)")


def _stopped(pid: int) -> bool:
    """Linux: the process is stopped (state T or t in /proc/<pid>/stat); False where that can't be read."""
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    return False


def _lock_file(f, deadline: float) -> bool:
    while not _try_lock(f):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _try_lock(f) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock_file(f):
    try:
        import fcntl
    except ImportError:
        import msvcrt
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
