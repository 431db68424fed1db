"""WeGen MLLM Encode (nodes/encode.py) under the stand-in ComfyUI host: cond + reply, image batches, seeds,
bad inputs."""
from __future__ import annotations

import pytest
import torch
from ComfyUI_WeGen.nodes.encode import WeGenMLLMEncode

from host_stubs import image

# MLLM Encode ---------------------------------------------------------------------------------------

def test_encode_returns_cond_and_reply(model):
    cond, reply = WeGenMLLMEncode().encode(model, "a red fox", max_new_tokens=8)
    assert tuple(cond.features.shape) == (1, 64, 112) and cond.features.dtype == torch.float32
    assert isinstance(reply, str) and reply == cond.texts[0]


def test_encode_with_image_batch_and_same_seed(model):
    node, refs = WeGenMLLMEncode(), image(B=2)
    a = node.encode(model, "", seed=7, temperature=0.8, max_new_tokens=4, images=refs)[0]
    b = node.encode(model, "", seed=7, temperature=0.8, max_new_tokens=4, images=refs)[0]
    single = node.encode(model, "", max_new_tokens=4, images=refs[:1])[0]
    assert torch.equal(a.features, b.features)
    assert not torch.equal(a.features, single.features)  # both images entered the prompt


@pytest.mark.parametrize("kwargs, words", [
    (dict(text=""), ["text is empty", "images"]),
    (dict(text=3), ["text must be a string"]),
    (dict(text="x", images=torch.rand(1, 64, 64, 4)), ["images", "3 RGB channels", "alpha"]),
    (dict(text="x", images=torch.zeros(1, 64, 64, 3, dtype=torch.uint8)), ["images", "floats"]),
    (dict(text="x", temperature=-1.0), ["temperature", "-1.0"]),
    (dict(text="x", top_p=0.0), ["top_p"]),
    (dict(text="x", feature_slice="middle"), ["feature_slice", "'middle'"]),
    (dict(text="x", seed=-1), ["seed", "-1"]),
])
def test_encode_bad_inputs(model, kwargs, words):
    with pytest.raises(ValueError) as e:
        WeGenMLLMEncode().encode(model, max_new_tokens=4, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_encode_rejects_a_foreign_model(comfy_host):
    with pytest.raises(ValueError, match="WEGEN_MODEL from a WeGen Loader"):
        WeGenMLLMEncode().encode("tiny", "x")
