"""A sweep interrupted or killed at every filesystem call it makes (sweep.json, features, PNGs, contact sheet):
what it left always loads, and `resume` then finishes it with every PNG equal to an uninterrupted run's and
removes the temp files (`.tmp-*`) the killed writes left, and nothing else.
The executor is a stand-in (deterministic features and pictures, no model): the write path is what is tested."""
import os
import shutil

import faults
import numpy as np
import pytest
import torch
from PIL import Image

from wegen import files, images, sweep_files
from wegen import sweep as sw

PROMPTS = ["a cat", "a tree"]
SEEDS = [5, 9]
SETTINGS = sw.SweepSettings(steps=1, width=64, height=64, max_batch=2)  # 2 decode batches of 2


class FakeExecutor:
    def __init__(self, info):
        self.info = info

    def encode(self, jobs, settings):
        for prompts, seeds in jobs:
            yield torch.stack([torch.randn(64, 112, generator=torch.Generator().manual_seed(len(p) * 1000 + s))
                               for p, s in zip(prompts, seeds)])

    def decode(self, jobs, settings):
        for features, seeds in jobs:
            yield torch.stack([(torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(s)) + f.mean()) % 1
                               for f, s in zip(features, seeds)])


def _u8(x):
    return (255.0 * x + 0.5).clamp(0, 255).to(torch.uint8)


def _pngs(out):
    return {n: np.asarray(Image.open(os.path.join(out, n)).convert("RGB"))
            for n in sorted(os.listdir(out)) if n.endswith(".png")}


@pytest.fixture(scope="module")
def info(engine):
    return sw.engine_info(engine)


def test_sweep_fault_at_every_fs_call_resumes_to_the_same_pictures(info, tmp_path, fast_fsync):
    ref_dir = str(tmp_path / "ref")
    ref = sw.run_sweep(FakeExecutor(info), PROMPTS, SEEDS, SETTINGS, out_dir=ref_dir)
    expected = _pngs(ref_dir)
    assert len(expected) == 5  # 4 pictures + the contact sheet
    out = str(tmp_path / "cut")

    def run():
        sw.run_sweep(FakeExecutor(info), PROMPTS, SEEDS, SETTINGS, out_dir=out)

    def check(k, mode, f):
        where = f"{mode} at fs call {k} ({f.failed})"
        started = os.path.isfile(os.path.join(out, sw.MANIFEST))
        if started:
            assert sw.load_manifest(out)["format"] == sweep_files.FORMAT, where  # what was left loads
        if mode == "kill":
            left_tmp[0] += bool(_temps(out))
        resumed = sw.run_sweep(FakeExecutor(info), PROMPTS, SEEDS, SETTINGS, out_dir=out, resume=True)
        assert torch.equal(_u8(resumed.images), _u8(ref.images)), where  # finished batches come back from PNG
        assert sw.load_manifest(out)["status"] == "done", where
        got = _pngs(out)
        assert got.keys() == expected.keys() and all(np.array_equal(got[n], expected[n]) for n in got), where
        assert _temps(out) == [], where  # what the killed writes left is gone
        shutil.rmtree(out)

    left_tmp = [0]
    tried = faults.sweep(run, (sw, sweep_files, files, images), check)
    print(f"\nfault injection, sweep: {tried} faulted runs (interrupt + kill), each resumed to the same pictures; "
          f"{left_tmp[0]} kills left temp files, removed by the resume")
    assert tried >= 20 and left_tmp[0] >= 5


def _temps(out):
    return [n for n in os.listdir(out) if n.startswith(".tmp-")] if os.path.isdir(out) else []


def test_resume_removes_only_the_projects_temp_files(info, tmp_path):
    out = tmp_path / "cut"
    sw.run_sweep(FakeExecutor(info), PROMPTS, SEEDS, SETTINGS, out_dir=str(out))
    ours = [".tmp-k1l2m3n4", ".tmp-probe-a_b9c0d1"]
    theirs = [".tmp-Notes.txt", "x.tmp-abc", ".tmp-", "notes.txt"]
    for name in ours + theirs:
        (out / name).write_bytes(b"half a file")
    (out / ".tmp-dir12345").mkdir()  # a folder: not a temp file of ours
    os.symlink(out / "notes.txt", out / ".tmp-link1234")  # a link: left alone
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match="already holds a sweep.json"):  # not resuming: nothing is touched
        sw.run_sweep(FakeExecutor(info), PROMPTS, SEEDS, SETTINGS, out_dir=str(out))
    assert sorted(os.listdir(out)) == before
    sw.run_sweep(FakeExecutor(info), PROMPTS, SEEDS, SETTINGS, out_dir=str(out), resume=True)
    assert sorted(os.listdir(out)) == sorted(set(before) - set(ours))
