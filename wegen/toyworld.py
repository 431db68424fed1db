"""The shapes world (shared/TOYWORLD.md): pictures, words and the rules that read any picture.

Every 64x64 picture holds one object on a flat background and is fully described by five attributes:
size, colour, shape, position, background (3 x 6 x 2 x 9 x 3 = 972 scenes before jitter). This module
renders a scene, reads the attributes back from pixels (the judge of every generated picture), and
speaks the world's words: full and partial descriptions, edit instructions, the understanding question.
numpy only: the DIIC pipeline, the training data and the evaluation all build on it.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, fields, replace

import numpy as np

CANVAS = 64
BACKGROUNDS = {"white": (235, 235, 235), "gray": (120, 120, 120), "black": (20, 20, 20)}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40),
           "purple": (150, 60, 190), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 14, "large": 26}  # bounding-box side in px
CENTRES = (16, 32, 48)
POSITIONS = {"top left": (16, 16), "top": (32, 16), "top right": (48, 16),
             "left": (16, 32), "center": (32, 32), "right": (48, 32),
             "bottom left": (16, 48), "bottom": (32, 48), "bottom right": (48, 48)}
MAX_JITTER = 2  # px, in x and in y
ATTRIBUTES = ("size", "colour", "shape", "position", "background")  # the order of a description
CHOICES = {"size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(POSITIONS),
           "background": tuple(BACKGROUNDS)}
# Reading rules (TOYWORLD.md "Reading a picture").
OBJECT_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is the object's
BORDER = 2
SMALL_BELOW = 20
SQUARE_ABOVE, CIRCLE_ABOVE = 0.90, 0.62
QUESTION = "describe the image"


@dataclass(frozen=True)
class Scene:
    """One picture's five attributes (+ jitter, which no description mentions)."""

    size: str
    colour: str
    shape: str
    position: str
    background: str
    dx: int = 0
    dy: int = 0

    def attributes(self) -> dict:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def without_jitter(self) -> "Scene":
        return replace(self, dx=0, dy=0)


def all_scenes() -> list[Scene]:
    """The 972 scenes without jitter, in a fixed order."""
    return [Scene(size, colour, shape, pos, bg) for size, colour, shape, pos, bg in
            itertools.product(*(CHOICES[a] for a in ATTRIBUTES))]


def random_scene(rng: random.Random, jitter: bool = True, **fixed) -> Scene:
    """A uniformly drawn scene; `fixed` attributes are kept."""
    values = {a: fixed.get(a) or rng.choice(CHOICES[a]) for a in ATTRIBUTES}
    dx, dy = (rng.randint(-MAX_JITTER, MAX_JITTER), rng.randint(-MAX_JITTER, MAX_JITTER)) if jitter else (0, 0)
    return Scene(**values, dx=dx, dy=dy)


def check_scene(scene: Scene):
    for a in ATTRIBUTES:
        if getattr(scene, a) not in CHOICES[a]:
            raise ValueError(f"{a} must be one of {CHOICES[a]}, got {getattr(scene, a)!r}")
    if abs(scene.dx) > MAX_JITTER or abs(scene.dy) > MAX_JITTER:
        raise ValueError(f"jitter must be within {MAX_JITTER} px, got ({scene.dx}, {scene.dy})")


# Rendering ---------------------------------------------------------------------------------------

_YS, _XS = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5  # pixel centres


def object_mask(scene: Scene) -> np.ndarray:
    """(64, 64) bool: the object's pixels (its bounding box is size x size, centred on the jittered centre)."""
    s = SIZES[scene.size]
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.dx, cy + scene.dy
    left, top = cx - s / 2, cy - s / 2
    inside = (_XS >= left) & (_XS < left + s) & (_YS >= top) & (_YS < top + s)
    if scene.shape == "square":
        return inside
    if scene.shape == "circle":
        return (_XS - cx) ** 2 + (_YS - cy) ** 2 <= (s / 2) ** 2
    # triangle: apex up, base at the bottom, base = height = size; at least the two centre pixels per row
    half = np.maximum((_YS - top) / s * (s / 2), 0.5)
    return inside & (np.abs(_XS - cx) <= half)


def render(scene: Scene) -> np.ndarray:
    """(64, 64, 3) uint8 picture of a scene."""
    check_scene(scene)
    img = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    img[object_mask(scene)] = COLOURS[scene.colour]
    return img


# Reading -----------------------------------------------------------------------------------------

def _nearest(rgb: np.ndarray, table: dict) -> str:
    names = list(table)
    d = [float(np.linalg.norm(rgb - np.asarray(table[n], dtype=np.float64))) for n in names]
    return names[int(np.argmin(d))]


def read(image) -> dict:
    """Attributes read from a picture by TOYWORLD.md's rules; object attributes are None when no object is seen.

    `image`: (64, 64, 3) uint8, or float in 0..1 (a generated picture). Other sizes are read as they are.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.round(img.astype(np.float64) * 255), 0, 255)
    img = img.astype(np.float64)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got {img.shape}")
    border = np.concatenate([img[:BORDER].reshape(-1, 3), img[-BORDER:].reshape(-1, 3),
                             img[:, :BORDER].reshape(-1, 3), img[:, -BORDER:].reshape(-1, 3)])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    far = np.linalg.norm(img - np.asarray(BACKGROUNDS[background], dtype=np.float64), axis=-1) > OBJECT_DISTANCE
    out = dict.fromkeys(ATTRIBUTES)
    out["background"] = background
    ys, xs = np.nonzero(far)
    if len(xs) == 0:
        return out
    out["colour"] = _nearest(np.median(img[far], axis=0), COLOURS)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    out["size"] = "small" if max(w, h) < SMALL_BELOW else "large"
    fill = len(xs) / float(w * h)
    out["shape"] = "square" if fill > SQUARE_ABOVE else ("circle" if fill >= CIRCLE_ABOVE else "triangle")
    return out


def matches(read_attrs: dict, wanted: dict) -> dict:
    """{attribute: read == wanted} for every attribute in `wanted` whose value is not None."""
    return {a: read_attrs.get(a) == v for a, v in wanted.items() if v is not None}


# Words -------------------------------------------------------------------------------------------

def describe(attrs) -> str:
    """Full or partial description; None (or missing) attributes are left out, `shape` stands in for the shape.

    `a large red circle at the top left on a white background`, `a red shape`, `a square at the top`.
    """
    if isinstance(attrs, Scene):
        attrs = attrs.attributes()
    words = ["a"]
    for a in ("size", "colour"):
        if attrs.get(a):
            words.append(attrs[a])
    words.append(attrs.get("shape") or "shape")
    if attrs.get("position"):
        words += ["at the", attrs["position"]]
    if attrs.get("background"):
        words += ["on a", attrs["background"], "background"]
    return " ".join(words)


def _alternatives(values) -> str:
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


_DESCRIPTION_RE = re.compile(
    rf"^a(?: (?P<size>{_alternatives(SIZES)}))?(?: (?P<colour>{_alternatives(COLOURS)}))?"
    rf" (?P<shape>{_alternatives(SHAPES)}|shape)(?: at the (?P<position>{_alternatives(POSITIONS)}))?"
    rf"(?: on a (?P<background>{_alternatives(BACKGROUNDS)}) background)?$")


def parse_description(text: str) -> dict | None:
    """Attributes of a (partial) description, None for those left out; None when it is not one."""
    m = _DESCRIPTION_RE.match(text.strip().lower())
    if m is None:
        return None
    attrs = m.groupdict()
    if attrs["shape"] == "shape":
        attrs["shape"] = None
    return {a: attrs[a] for a in ATTRIBUTES}


def is_full(attrs: dict | None) -> bool:
    return attrs is not None and all(attrs.get(a) for a in ATTRIBUTES)


def partial(attrs: dict, keep: set) -> dict:
    """The attributes in `keep`, the others None."""
    return {a: (attrs[a] if a in keep else None) for a in ATTRIBUTES}


def random_partial(rng: random.Random, scene: Scene, min_keep: int = 0, max_keep: int = 4) -> dict:
    """A partial description of `scene`: between min_keep and max_keep attributes kept, chosen at random."""
    keep = set(rng.sample(ATTRIBUTES, rng.randint(min_keep, max_keep)))
    return partial(scene.attributes(), keep)


def edit_instruction(attribute: str, value: str) -> str:
    """The instruction that changes one attribute to `value` (all others must stay)."""
    if value not in CHOICES.get(attribute, ()):
        raise ValueError(f"{attribute!r} cannot be {value!r}; allowed: {CHOICES.get(attribute)}")
    return {"colour": f"make it {value}", "shape": f"make it a {value}", "size": f"make it {value}",
            "position": f"move it to the {value}", "background": f"make the background {value}"}[attribute]


_EDIT_PATTERNS = [
    ("colour", re.compile(rf"^make it ({_alternatives(COLOURS)})$")),
    ("shape", re.compile(rf"^make it a ({_alternatives(SHAPES)})$")),
    ("size", re.compile(rf"^make it ({_alternatives(SIZES)})$")),
    ("position", re.compile(rf"^move it to the ({_alternatives(POSITIONS)})$")),
    ("background", re.compile(rf"^make the background ({_alternatives(BACKGROUNDS)})$")),
]


def parse_edit(text: str) -> tuple[str, str] | None:
    """(attribute, value) of an edit instruction, None when it is not one."""
    text = text.strip().lower()
    for attribute, pattern in _EDIT_PATTERNS:
        m = pattern.match(text)
        if m:
            return attribute, m.group(1)
    return None


def apply_edit(scene: Scene, attribute: str, value: str) -> Scene:
    return replace(scene, **{attribute: value})


def changed_attributes(a: dict, b: dict) -> list[str]:
    return [k for k in ATTRIBUTES if a.get(k) != b.get(k)]


def random_edit(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """(attribute, new value) that changes exactly one attribute of `scene`."""
    attribute = rng.choice(ATTRIBUTES)
    value = rng.choice([v for v in CHOICES[attribute] if v != getattr(scene, attribute)])
    return attribute, value


assert [f.name for f in fields(Scene)][:5] == list(ATTRIBUTES)
