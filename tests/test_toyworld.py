"""The shapes world (shared/TOYWORLD.md): every scene renders and reads back right; the words round-trip."""
import itertools
import random
from dataclasses import replace

import numpy as np
import pytest

from wegen import toyworld as tw

JITTERS = [(0, 0)] + list(itertools.product((-tw.MAX_JITTER, tw.MAX_JITTER), repeat=2))


def test_every_scene_and_the_jitter_extremes_read_back_right():
    scenes = tw.all_scenes()
    assert len(scenes) == len(set(scenes)) == 972
    wrong = [(s, dx, dy) for s in scenes for dx, dy in JITTERS
             if tw.read(tw.render(replace(s, dx=dx, dy=dy))) != s.attributes()]
    assert not wrong, f"{len(wrong)} misread, e.g. {wrong[:3]}"


def test_a_float_picture_reads_like_its_uint8_one():
    scene = tw.Scene("small", "purple", "triangle", "bottom right", "gray", dx=2, dy=-2)
    assert tw.read(tw.render(scene).astype(np.float32) / 255) == scene.attributes()


def test_jitter_moves_the_object_and_no_description_mentions_it():
    scene = tw.Scene("large", "red", "circle", "center", "white")
    moved = replace(scene, dx=2, dy=-1)
    assert (tw.object_mask(moved) != tw.object_mask(scene)).any()
    assert tw.object_mask(moved).sum() == tw.object_mask(scene).sum()
    assert tw.describe(moved) == tw.describe(scene) == "a large red circle at the center on a white background"


def test_full_descriptions_round_trip():
    for scene in tw.all_scenes():
        assert tw.parse_description(tw.describe(scene)) == scene.attributes()
        assert tw.is_full(tw.parse_description(tw.describe(scene)))


def test_partial_descriptions_round_trip_for_every_subset():
    rng = random.Random(0)
    for scene in rng.sample(tw.all_scenes(), 20):
        for r in range(len(tw.ATTRIBUTES) + 1):
            for keep in itertools.combinations(tw.ATTRIBUTES, r):
                attrs = tw.partial(scene.attributes(), set(keep))
                text = tw.describe(attrs)
                assert tw.parse_description(text) == attrs, text
                assert tw.is_full(tw.parse_description(text)) == (r == len(tw.ATTRIBUTES))
    assert tw.describe({}) == "a shape" and tw.describe({"colour": "red"}) == "a red shape"
    assert tw.parse_description("a square at the top") == tw.partial(
        {"shape": "square", "position": "top"}, {"shape", "position"})


@pytest.mark.parametrize("text", ["", "a", "the red circle", "a pink circle", "a circle at top",
                                  "a red circle on a blue background", "a circle a circle", "a shape shape"])
def test_what_is_not_a_description_parses_to_none(text):
    assert tw.parse_description(text) is None


def test_edit_instructions_round_trip_and_change_one_attribute():
    for attribute in tw.ATTRIBUTES:
        for value in tw.CHOICES[attribute]:
            assert tw.parse_edit(tw.edit_instruction(attribute, value)) == (attribute, value)
    texts = [tw.edit_instruction(a, v) for a in tw.ATTRIBUTES for v in tw.CHOICES[a]]
    assert len(set(texts)) == len(texts) == 2 + 6 + 3 + 9 + 3
    assert tw.parse_edit("make it pink") is None and tw.parse_edit("describe the image") is None
    rng = random.Random(1)
    for _ in range(200):
        scene = tw.random_scene(rng)
        attribute, value = tw.random_edit(rng, scene)
        edited = tw.apply_edit(scene, attribute, value)
        assert tw.changed_attributes(scene.attributes(), edited.attributes()) == [attribute]
        assert getattr(edited, attribute) == value


@pytest.mark.parametrize("background", list(tw.BACKGROUNDS))
def test_a_blank_picture_reads_no_object(background):
    blank = np.full((tw.CANVAS, tw.CANVAS, 3), tw.BACKGROUNDS[background], dtype=np.uint8)
    assert tw.read(blank) == {"size": None, "colour": None, "shape": None, "position": None,
                              "background": background}
    assert not tw.matches(tw.read(blank), {"colour": "red"})["colour"]


@pytest.mark.parametrize("attribute, value", [("size", "huge"), ("colour", "pink"), ("shape", "star"),
                                              ("position", "middle"), ("background", "blue")])
def test_bad_values_raise_naming_the_attribute(attribute, value):
    scene = replace(tw.Scene("small", "red", "circle", "center", "white"), **{attribute: value})
    with pytest.raises(ValueError, match=attribute):
        tw.render(scene)
    with pytest.raises(ValueError, match=attribute):
        tw.edit_instruction(attribute, value)


def test_bad_jitter_and_bad_picture_shapes_raise():
    with pytest.raises(ValueError, match="jitter"):
        tw.render(tw.Scene("small", "red", "circle", "center", "white", dx=tw.MAX_JITTER + 1))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        tw.read(np.zeros((64, 64), dtype=np.uint8))
