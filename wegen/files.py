"""Writing files so that a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile

TEMP_PREFIX = ".tmp-"  # write_atomic's and probe_folder's temp files: .tmp-XXXXXXXX, .tmp-probe-XXXXXXXX
_TEMP_RE = re.compile(r"\.tmp-(?:probe-)?[a-z0-9_]+")


def write_atomic(path: str, data: bytes):
    """Temp file in the same folder, fsync, os.replace: readers see the old or the new file, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def remove_temp_files(folder: str) -> list[str]:
    """Delete the temp files a killed write_atomic / probe_folder left in `folder` (regular files named like
    theirs; nothing else); returns their names. Call only while no other writer uses the folder."""
    removed = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        with contextlib.suppress(OSError):
            if _TEMP_RE.fullmatch(entry) and stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
                removed.append(entry)
    return removed


def fsync_dir(folder: str):
    """Make the rename durable; best effort (some filesystems refuse): the new file is already in place."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: str, data) -> str:
    """`data` as indented UTF-8 JSON, written atomically; returns the path."""
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))
    return path


def probe_folder(folder: str, what: str) -> str:
    """Write, fsync and remove a small file in `folder` now, so a read-only or full disk is found before any
    work (not after the model ran); ValueError naming `what` otherwise."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}probe-", dir=folder)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{what} cannot be written: {folder}: {e.strerror or e}") from None
    return folder
