"""Fault injection (no sleeps): fail the k-th filesystem call that chosen wegen modules make.

`inject(k, mode, modules)` swaps each module's `os`, `shutil`, `tempfile` and `open` for counting stand-ins
while the block runs. Every call in FS_CALLS counts; call k fails:
  mode "interrupt": KeyboardInterrupt at call k only (clean-up handlers run, as after Ctrl+C);
  mode "kill": Killed at call k and at every later call (no handler can touch the disk: as after kill -9;
  the OS file lock goes with the process, as the `with` blocks release it here).
`sweep(run, modules)` runs `run()` for k = 1, 2, ... in both modes until a run completes with no fault,
calling `check(k, mode, faults)` after each faulted run; it returns the number of faulted runs.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import shutil
import tempfile
import types

FS_CALLS = {
    "os": ("replace", "rename", "fsync", "mkdir", "makedirs", "rmdir", "unlink", "remove", "open", "fdopen",
           "listdir", "scandir", "truncate"),
    "shutil": ("rmtree", "copytree", "copy2", "copyfile", "move"),
    "tempfile": ("mkstemp", "mkdtemp", "NamedTemporaryFile"),
}
MODES = ("interrupt", "kill")


class Killed(BaseException):
    """The process died at this filesystem call."""


class Faults:
    def __init__(self, k: int, mode: str):
        self.k, self.mode, self.calls, self.failed = k, mode, 0, None

    def hit(self, name: str):
        self.calls += 1
        if self.calls == self.k or (self.mode == "kill" and self.calls > self.k):
            self.failed = self.failed or name
            raise (KeyboardInterrupt if self.mode == "interrupt" else Killed)(f"fault at fs call {self.calls}: {name}")


def _stand_in(module, names, faults: Faults):
    proxy = types.ModuleType(module.__name__)
    proxy.__dict__.update(module.__dict__)
    for n in names:
        real = getattr(module, n, None)
        if real is None:
            continue

        def call(*args, _real=real, _name=f"{module.__name__}.{n}", **kwargs):
            faults.hit(_name)
            return _real(*args, **kwargs)
        setattr(proxy, n, call)
    return proxy


_MISSING = object()



@contextlib.contextmanager
def inject(k: int, mode: str, modules):
    faults = Faults(k, mode)
    saved = []
    real_modules = {"os": os, "shutil": shutil, "tempfile": tempfile}
    for m in modules:
        for attr, real in real_modules.items():
            if m.__dict__.get(attr) is real:
                saved.append((m, attr, real))
                setattr(m, attr, _stand_in(real, FS_CALLS[attr], faults))
        saved.append((m, "open", m.__dict__.get("open", _MISSING)))

        def opener(*args, **kwargs):
            faults.hit("open")
            return builtins.open(*args, **kwargs)
        m.open = opener
    try:
        yield faults
    finally:
        for m, attr, value in reversed(saved):
            if value is _MISSING:
                delattr(m, attr)
            else:
                setattr(m, attr, value)


def sweep(run, modules, check, limit: int = 500) -> int:
    """run() with a fault at fs call k = 1, 2, ... (both modes) until it completes; check(k, mode, faults) after
    each faulted run. Returns how many faulted runs there were."""
    tried = 0
    for mode in MODES:
        for k in range(1, limit):
            with inject(k, mode, modules) as faults:
                try:
                    run()
                except (KeyboardInterrupt, Killed):
                    pass
            if faults.failed is None:  # ran to the end: every call has had its fault
                assert faults.calls == k - 1, (mode, k, faults.calls)
                break
            tried += 1
            check(k, mode, faults)
        else:
            raise AssertionError(f"{mode}: still failing after {limit} faults")
    return tried


def folder_state(path) -> dict:
    """{relative path: sha256 of the file, or "<dir>"} of everything under path (hidden files included): equal
    before and after an operation means it changed nothing on disk."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            state[os.path.relpath(os.path.join(dirpath, d), path)] = "<dir>"
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as fh:
                state[os.path.relpath(os.path.join(dirpath, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return state
