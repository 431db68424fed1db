"""Golden slices: fixed pixels of seeded generations, so that any change to the numerics is seen.

A 3x3 corner and a 3x3 centre patch (all three channels) of one 64x64 image, plus the first values of its
features, compared with values recorded from this code (fp32, CPU, torch 2.13) within ATOL. A change to the
prompt template, the MLLM decode, the feature slice, the noise, the scheduler, the UNet, the VAE or the
clamping moves them by more than ATOL (measured: one denoising step more moves the tiny corner by 1e-2, cfg 2.0 ->
2.01 the toy's by 2e-2, sigma^2 + 1.001 for sigma^2 + 1 in the Euler input scaling the tiny centre by 1.3e-4);
float-rounding noise stays below it (1 vs 2 CPU threads: 4e-6). When a change is meant to alter the
numbers, run `GOLDEN_PRINT=1 python -m pytest -s tests/test_golden.py`, check the new pictures, and paste the
printed values here (and say why in the commit).

Two checkpoints: the tiny random-weight one (`make_tiny(seed=0)`, tests/conftest.py) and the shipped trained
toy (checkpoints/wegen-toy; skipped when absent).
"""
from __future__ import annotations

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "checkpoints", "wegen-toy")
ATOL = 1e-4  # on [0, 1] pixels and on features; float-rounding noise here is < 4e-6

pytestmark = pytest.mark.usefixtures("one_thread")


def _slices(images: torch.Tensor, features: torch.Tensor) -> dict:
    """(1, H, W, 3) image + (1, 64, C) features -> the golden slices as nested lists."""
    h, w = images.shape[1:3]
    return {
        "corner": images[0, :3, :3, :],  # top-left 3x3, RGB
        "centre": images[0, h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2, :],
        "features": features[0, [0, -1], :4],  # first and last image token, first 4 channels
    }


def _rounded(x):
    return [_rounded(v) for v in x] if isinstance(x, list) else round(x, 6)


def _check(got: dict, golden: dict):
    if os.environ.get("GOLDEN_PRINT"):
        for name, value in got.items():
            print(f"    {name!r}: {_rounded(value.tolist())},")
    for name, value in got.items():
        torch.testing.assert_close(value, torch.tensor(golden[name]), rtol=0, atol=ATOL,
                                   msg=lambda m, name=name: f"golden slice {name!r} moved: {m}")


# The tiny random-weight checkpoint: prompt -> features -> 3 Euler steps -> 64x64 image ---------------------

TINY_RUN = dict(seed=8, steps=3, cfg=2.0, width=64, height=64)
TINY = {
    "corner": [[[0.542987, 0.453682, 0.534957], [0.528351, 0.520779, 0.482423], [0.603763, 0.542457, 0.522851]],
               [[0.554041, 0.621681, 0.525132], [0.57776, 0.754847, 0.559647], [0.65733, 0.679592, 0.504369]],
               [[0.579733, 0.619408, 0.48746], [0.594417, 0.726865, 0.571254], [0.665835, 0.663278, 0.429154]]],
    "centre": [[[0.510715, 0.666908, 0.540513], [0.516382, 0.693417, 0.713013], [0.365039, 0.562393, 0.75174]],
               [[0.275484, 0.596423, 0.779878], [0.376398, 0.617061, 0.811388], [0.212346, 0.503316, 0.909652]],
               [[0.173664, 0.457552, 0.741598], [0.260677, 0.550089, 0.821674], [0.0, 0.406208, 0.849085]]],
    "features": [[0.074691, 0.015073, -0.141755, 0.176197], [-0.133142, 0.301826, -0.291702, 0.115396]],
}


def test_tiny_checkpoint_golden_slice(engine):
    images, cond = engine.generate("a red circle on the left", **TINY_RUN)
    assert images.shape == (1, 64, 64, 3)
    _check(_slices(images, cond.features), TINY)


# The shipped toy checkpoint (trained): its recommended feature slice, 4 steps -----------------------------

TOY_RUN = dict(seed=7, steps=4, cfg=2.0, width=64, height=64, feature_slice="aligned")
TOY = {
    "corner": [[[0.748245, 0.744901, 0.853238], [0.816721, 0.832269, 0.894988], [0.78578, 0.798, 0.88686]],
               [[0.733588, 0.681407, 0.779884], [0.827711, 0.772426, 0.817096], [0.79923, 0.744765, 0.781776]],
               [[0.709509, 0.652478, 0.725798], [0.807779, 0.772101, 0.74865], [0.781189, 0.725726, 0.728415]]],
    "centre": [[[0.842398, 0.799058, 0.789737], [0.825576, 0.749994, 0.76687], [0.815983, 0.743642, 0.771875]],
               [[0.793265, 0.782089, 0.814756], [0.774776, 0.749899, 0.798341], [0.767024, 0.736121, 0.791215]],
               [[0.800301, 0.796694, 0.822862], [0.784787, 0.777895, 0.819293], [0.77428, 0.768355, 0.815974]]],
    "features": [[-3.438873, -5.344653, 3.717805, 1.662411], [-5.590745, -0.54932, 0.339878, -0.336314]],
}


def test_shipped_toy_checkpoint_golden_slice():
    from wegen.engine import WeGenEngine
    from wegen.loading import CONVERTED_CONFIG

    if not os.path.isfile(os.path.join(SHIPPED, CONVERTED_CONFIG)):
        pytest.skip(f"no shipped toy checkpoint at {SHIPPED}")
    toy = WeGenEngine.load(SHIPPED, dtype="fp32", device="cpu")
    images, cond = toy.generate("a red circle at the top left", **TOY_RUN)
    _check(_slices(images, cond.features), TOY)
