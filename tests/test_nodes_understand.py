"""WeGen Understand (nodes/understand.py) under the stand-in ComfyUI host: the answer, shown on the node,
bad inputs."""
from __future__ import annotations

import pytest
from ComfyUI_WeGen.nodes.understand import WeGenUnderstand

from host_stubs import image


def test_understand_returns_text_and_shows_it(comfy_host, model):
    node = WeGenUnderstand()
    out = node.understand(model, image(B=2), "What is this?", max_new_tokens=6, unique_id="7")
    assert isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], str)
    assert out == node.understand(model, image(B=2), "What is this?", max_new_tokens=6)
    assert comfy_host.texts[0] == ("7", out[0])


@pytest.mark.parametrize("kwargs, words", [
    (dict(question="  "), ["question is empty"]),
    (dict(images=None), ["images must be an IMAGE"]),
    (dict(max_new_tokens=0), ["max_new_tokens", "0"]),
])
def test_understand_bad_inputs(model, kwargs, words):
    args = {"images": image(), "question": "What?", **kwargs}
    with pytest.raises(ValueError) as e:
        WeGenUnderstand().understand(model, **args)
    assert all(w in str(e.value) for w in words), str(e.value)
