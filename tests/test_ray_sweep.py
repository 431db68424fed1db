"""Ray sweeps (extension) on a local Ray instance: same images as the plain sweep, resumable, rewrite on an actor.

One Ray start (two CPU actors, each loading the tiny engine) serves every check: starting Ray and its
workers is the slow part (tens of seconds on two cores). Skipped when the optional ray package is missing.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from wegen import sweep as sw

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration  # a local Ray cluster: worker processes

PROMPTS = ["a cat", "a red bicycle on a long road at dusk"]
SEEDS = [5, 9]
SETTINGS = sw.SweepSettings(steps=2, width=64, height=64, max_batch=2)  # decode batches [0, 1] and [2, 3]


class _Interrupt(Exception):
    pass


def _stop(done, total):
    raise _Interrupt


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_ray_sweep_equals_plain_sweep_and_resumes(engine, tiny_ckpt, tmp_path):
    from wegen.ray_sweep import RayExecutor
    from wegen.rewrite import rewrite_prompt

    plain = sw.sweep(engine, PROMPTS, SEEDS, SETTINGS, out_dir=str(tmp_path / "plain"))
    cut = str(tmp_path / "cut")
    with pytest.raises(_Interrupt):  # a plain sweep stopped after its first batch, finished on Ray below
        sw.sweep(engine, PROMPTS, SEEDS, SETTINGS, out_dir=cut, progress=_stop)
    local_rewrite = rewrite_prompt(engine, "a cat", 2, seed=3, max_new_tokens=6)

    with RayExecutor(tiny_ckpt, dtype="fp32", workers=2) as ex:
        assert len(ex.actors) == 2 and ex.info["threads"] == torch.get_num_threads()
        fresh = sw.run_sweep(ex, PROMPTS, SEEDS, SETTINGS, out_dir=str(tmp_path / "ray"))
        resumed = sw.run_sweep(ex, PROMPTS, SEEDS, SETTINGS, out_dir=cut, resume=True)
        remote_rewrite = ex.rewrite("a cat", 2, seed=3, max_new_tokens=6)
        with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.1000"):
            list(ex.decode([(plain.features[:1], [1])], sw.SweepSettings(steps=0, width=64, height=64)))
    assert not ray.is_initialized()  # the executor started Ray, so it shut it down

    assert torch.equal(fresh.features, plain.features) and torch.equal(fresh.images, plain.images)
    assert fresh.diversity == plain.diversity
    assert fresh.manifest["decode_batches"] == plain.manifest["decode_batches"]
    assert torch.equal(resumed.images[2:], plain.images[2:])
    for it in plain.manifest["items"]:
        expected = _png(tmp_path / "plain" / it["file"])
        assert np.array_equal(_png(tmp_path / "ray" / it["file"]), expected)
        assert np.array_equal(_png(os.path.join(cut, it["file"])), expected)
    assert remote_rewrite.prompts == local_rewrite.prompts and remote_rewrite.seeds == local_rewrite.seeds


def test_bad_worker_count_fails_before_ray_starts():
    from wegen.ray_sweep import RayExecutor

    with pytest.raises(ValueError, match="workers .* must be a positive integer, got 0"):
        RayExecutor("unused", workers=0)
    assert not ray.is_initialized()
