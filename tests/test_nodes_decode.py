"""WeGen Consistency Decode and Reconstruct (nodes/decode.py) under the stand-in ComfyUI host: IMAGE layout,
seeds per batch row, masks, bad inputs. Tiny checkpoint, 64 px, 2 steps."""
from __future__ import annotations

import pytest
import torch
from ComfyUI_WeGen.nodes.decode import WeGenConsistencyDecode, WeGenReconstruct

from host_stubs import SMALL, center_mask, check_image, image


@pytest.fixture(scope="session")
def engine(pack_engine):
    """The nodes' copy of the engine (ComfyUI_WeGen.wegen): the one their loader caches."""
    return pack_engine


# Consistency Decode -------------------------------------------------------------------------------

def test_decode_image_layout_and_seeds(model, cond):
    node = WeGenConsistencyDecode()
    out = node.decode(model, cond, seed=5, **SMALL)
    assert isinstance(out, tuple) and len(out) == len(node.RETURN_TYPES)
    check_image(out[0], 1, 64, 64)
    assert torch.equal(out[0], node.decode(model, cond, seed=5, **SMALL)[0])
    assert not torch.equal(out[0], node.decode(model, cond, seed=6, **SMALL)[0])


def test_decode_batch_of_references_uses_seed_plus_row(model, cond):
    node, ref = WeGenConsistencyDecode(), image(B=2)
    out = node.decode(model, cond, seed=5, reference=ref, strength=0.5, **SMALL)[0]
    check_image(out, 2, 64, 64)
    row1 = node.decode(model, cond, seed=6, reference=ref[1:], strength=0.5, **SMALL)[0]
    assert torch.allclose(out[1:], row1, atol=1e-4)  # batched kernels may round differently
    assert not torch.allclose(out[:1], row1, atol=1e-2)


def test_decode_seed_wraps_at_the_top_of_the_range(model, cond):
    node, ref = WeGenConsistencyDecode(), image(B=2)
    out = node.decode(model, cond, seed=2**64 - 1, reference=ref, strength=0.5, **SMALL)[0]
    row1 = node.decode(model, cond, seed=0, reference=ref[1:], strength=0.5, **SMALL)[0]
    assert torch.allclose(out[1:], row1, atol=1e-4)


def test_decode_mask_keeps_the_reference_outside(model, cond):
    ref, mask = image(), center_mask()
    out = WeGenConsistencyDecode().decode(model, cond, seed=1, reference=ref, mask=mask, strength=1.0, feather=4,
                                          **SMALL)[0]
    check_image(out, 1, 64, 64)
    keep = torch.ones(64, 64, dtype=torch.bool)
    keep[16 - 4:48 + 4, 16 - 4:48 + 4] = False  # mask + feather
    assert torch.equal(out[0][keep], ref[0][keep])
    assert not torch.equal(out[0][~keep], ref[0][~keep])


def test_decode_accepts_a_2d_mask_of_the_same_aspect(model, cond):
    mask = center_mask(H=32, W=32)[0]  # (H, W), half size
    out = WeGenConsistencyDecode().decode(model, cond, seed=1, reference=image(), mask=mask, strength=0.7, **SMALL)
    check_image(out[0], 1, 64, 64)


@pytest.mark.parametrize("kwargs, words", [
    (dict(mask=center_mask()), ["mask needs a reference"]),
    (dict(strength=0.5), ["strength 0.5 needs a reference"]),
    (dict(reference=image()), ["reference without a mask needs strength < 1"]),
    (dict(reference=image(H=48), strength=0.5), ["reference is 64x48", "width x height is 64x64"]),
    (dict(reference=image(), mask=torch.zeros(1, 64, 64)), ["mask row(s) [0] are empty", "LoadImage"]),
    (dict(reference=image(), mask=torch.ones(1, 64, 64)), ["covers every pixel", "strength"]),
    (dict(reference=image(), mask=center_mask(H=64, W=32)), ["mask is 32x64", "aspect"]),
    (dict(reference=image(B=3), strength=0.5, mask=center_mask(B=2)), ["batch sizes", "reference has 3", "mask has 2"]),
    (dict(reference=image(), mask=center_mask(), feather=-1), ["feather", "-1"]),
    (dict(strength=1.5), ["strength must be in 0..1"]),
    (dict(width=60), ["width", "multiple of 8", "60"]),
    (dict(steps=-1), ["steps", "1..1000"]),
    (dict(cfg=-0.5), ["cfg", ">= 0", "-1", "checkpoint's recommendation"]),
    (dict(reference=image(), strength=0.01, steps=2), ["no denoising step"]),
])
def test_decode_refuses_what_it_cannot_do(model, cond, kwargs, words):
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError) as e:
        WeGenConsistencyDecode().decode(model, cond, seed=0, **args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_decode_rejects_bad_conds(model, engine):
    with pytest.raises(ValueError, match="WEGEN_COND from a WeGen MLLM Encode"):
        WeGenConsistencyDecode().decode(model, "a cat", seed=0, **SMALL)
    foreign = type("Cond", (), {"features": torch.zeros(1, 64, 1792)})()
    with pytest.raises(ValueError, match=r"\(1, 64, 1792\).*same checkpoint"):
        WeGenConsistencyDecode().decode(model, foreign, seed=0, **SMALL)
    two = engine.encode(["a", "b"], max_new_tokens=4)
    with pytest.raises(ValueError, match="cond has 2"):
        WeGenConsistencyDecode().decode(model, two, seed=0, reference=image(B=3), strength=0.5, **SMALL)


# Reconstruct --------------------------------------------------------------------------------------

def test_reconstruct_batch_and_seed(model):
    node, pics = WeGenReconstruct(), image(B=2, H=40, W=56)
    out = node.reconstruct(model, pics, seed=3, **SMALL)
    assert len(out) == 1
    check_image(out[0], 2, 64, 64)
    assert torch.equal(out[0], node.reconstruct(model, pics, seed=3, **SMALL)[0])


@pytest.mark.parametrize("kwargs, words", [
    (dict(images=torch.rand(64, 64)), ["images", "(B, H, W, 3)"]),
    (dict(images="pic.png"), ["images must be an IMAGE"]),
    (dict(height=-8), ["height", "multiple of 8"]),
])
def test_reconstruct_bad_inputs(model, kwargs, words):
    args = {"images": image(), "seed": 0, **SMALL, **kwargs}
    with pytest.raises(ValueError) as e:
        WeGenReconstruct().reconstruct(model, **args)
    assert all(w in str(e.value) for w in words), str(e.value)
