"""Shared fixtures: one tiny checkpoint per test session (official layout), engines on the CPU.

The pack loaded as ComfyUI loads it, and the stand-in ComfyUI host for node tests: the plugin tests/host_stubs.py.
"""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest_plugins = ["host_stubs", "comfyui_host"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """Path of a tiny random-weight checkpoint in the official wegen_mllm_ckpt/ layout (seed 0)."""
    from wegen.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("ckpt") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def engine(tiny_ckpt):
    """The float32 CPU engine on the tiny checkpoint (cached by WeGenEngine.load)."""
    from wegen.engine import WeGenEngine

    return WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Small ops on a shared 2-core machine: one intra-op thread is several times faster (restored after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def session_held():
    """hold(root, name): a context manager keeping a chat session's lock in another thread (a turn running)."""
    import contextlib
    import threading

    from wegen import sessions

    @contextlib.contextmanager
    def hold(root, name):
        held, release = threading.Event(), threading.Event()

        def running_turn():
            with sessions.session_lock(root, name):
                held.set()
                release.wait(10)

        worker = threading.Thread(target=running_turn)
        worker.start()
        held.wait(10)
        try:
            yield
        finally:
            release.set()
            worker.join()

    return hold


@pytest.fixture
def fast_fsync(monkeypatch):
    """os.fsync as a no-op: the fault-injection sweeps (tests/faults.py) simulate a process that dies, not a machine
    that loses power, and thousands of fsyncs are slow on a shared disk."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


class _EagerGraph:
    """Stand-in for a CUDA graph on the CPU: replay runs the captured function again."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


@pytest.fixture
def cpu_graphs(monkeypatch):
    """fastpath's graph code on the CPU (tests/test_fastpath.py, test_fastdecode.py): _capture_graph keeps its
    warm-up/reset contract, replay re-runs."""
    from wegen import fastpath

    captured = []

    def capture(fn, device, warmup, reset=None):
        for _ in range(warmup):
            fn()
        if reset is not None:
            reset()
        captured.append(fn)
        return _EagerGraph(fn)

    monkeypatch.setattr(fastpath, "_capture_graph", capture)
    with fastpath.settings(static_on_cpu=True, graphs_on_cpu=True):
        yield captured
