"""DIIC stand-in: mine single-change edit sequences from clips of the shapes world (shared/TOYWORLD.md, "Videos").

The paper's DIIC mines instance dynamics from Internet videos and labels them with foundation models. Here the
videos are procedural clips in which one instance changes one attribute at a time, with jitter and, in some clips,
distractor frames (blank, pixel noise, a cut to an unrelated scene, a second object). The miner sees only the
frames: it segments and checks the instance in each frame, labels it with the attribute reader (the stand-in for
the foundation-model labeller), drops frames that do not continue the track, and keeps consecutive states that
differ in exactly one attribute, each with its edit instruction, as interleaved sequences
(image, instruction, image, ...). The clip generator's ground truth only scores the result (precision, yield).
numpy + Pillow only.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from . import toyworld as tw

MIN_FRAMES, MAX_FRAMES = 8, 16
DISTRACTOR_CLIP_RATE = 0.3  # share of clips with 1-2 distractor frames
DISTRACTORS = ("blank", "noise", "cut", "two")
REAL = "real"
MIN_VISIBLE = 40  # px of each object left visible in a two-object frame
# Mining thresholds: a rendered frame passes every check exactly; they leave room for mild real-video noise.
PALETTE_DISTANCE = 20.0  # a pixel farther than this from every world colour is off-palette ...
MAX_OFF_PALETTE = 0.01  # ... and a frame with more of those than this share is pixel noise
BACKGROUND_DISTANCE = 30.0  # the border's median colour must be this close to a background colour
MIN_AREA, MAX_AREA = 40, 1200  # px of the instance
COLOUR_DISTANCE = 30.0  # instance pixels within this of their median colour, the median within it of a colour
MAX_OFF_COLOUR = 0.01
FIT_TOLERANCE = 0.02  # mask pixels the labelled object may miss or add (share of the area, at least 3 px)
MAX_GAP = 3  # a track breaks when more frames than MAX_GAP - 1 in a row are dropped
MIN_SEGMENT = 3  # frames a track needs before its changes are trusted
_WORLD_COLOURS = np.array(list(tw.BACKGROUNDS.values()) + list(tw.COLOURS.values()), dtype=np.float64)


@dataclass
class Clip:
    """Frames ((64, 64, 3) uint8) and, for generated clips, the ground truth per frame.

    scenes[i]: the instance's Scene in a real frame, None in a distractor frame; kinds[i]: "real" or the
    distractor's kind. Both are None for clips read from PNG files.
    """

    frames: list
    scenes: list | None = None
    kinds: list | None = None
    name: str = ""


def _diff(a: dict, b: dict) -> int:
    return len(tw.changed_attributes(a, b))


# Clip generator (ground truth known) -------------------------------------------------------------

def make_clip(rng: random.Random, n_frames: int | None = None) -> Clip:
    """One instance changing one attribute at a time, each state held 1-3 frames, jitter re-drawn per frame."""
    n = rng.randint(MIN_FRAMES, MAX_FRAMES) if n_frames is None else n_frames
    if not isinstance(n, int) or not MIN_FRAMES <= n <= MAX_FRAMES:
        raise ValueError(f"n_frames must be an integer in {MIN_FRAMES}..{MAX_FRAMES}, got {n!r}")
    scene, states = tw.random_scene(rng, jitter=False), []
    while len(states) < n:
        states += [scene] * rng.randint(1, 3)
        scene = tw.apply_edit(scene, *tw.random_edit(rng, scene))
    states = states[:n]
    j = tw.MAX_JITTER
    scenes = [replace(s, dx=rng.randint(-j, j), dy=rng.randint(-j, j)) for s in states]
    frames, kinds = [tw.render(s) for s in scenes], [REAL] * n
    if rng.random() < DISTRACTOR_CLIP_RATE:
        for k in _distractor_slots(rng, n):
            kinds[k] = rng.choice(DISTRACTORS)
            frames[k] = _distractor(rng, kinds[k], states, scenes[k], k)
            scenes[k] = None
    return Clip(frames, scenes, kinds)


def _distractor_slots(rng: random.Random, n: int) -> list[int]:
    """1 or 2 frame indices, never adjacent."""
    first = rng.randrange(n)
    if rng.random() < 0.5:
        return [first]
    return [first, rng.choice([k for k in range(n) if abs(k - first) > 1])]


def _distractor(rng: random.Random, kind: str, states: list, scene: tw.Scene, k: int) -> np.ndarray:
    if kind == "blank":
        return np.full((tw.CANVAS, tw.CANVAS, 3), tw.BACKGROUNDS[scene.background], dtype=np.uint8)
    if kind == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(25, 60), (tw.CANVAS, tw.CANVAS, 3))
        return np.clip(tw.render(scene) + noise, 0, 255).astype(np.uint8)
    if kind == "cut":  # an unrelated scene: at least 3 attributes away from the states around it
        near = [s.attributes() for s in states[max(k - 1, 0):k + 2]]
        while True:
            cut = tw.random_scene(rng)
            if all(_diff(cut.attributes(), s) >= 3 for s in near):
                return tw.render(cut)
    return _two_objects(rng, scene)


def _two_objects(rng: random.Random, scene: tw.Scene) -> np.ndarray:
    """The instance and a second, different object (another place, 2+ of size/colour/shape), both visible."""
    while True:
        other = tw.random_scene(rng, background=scene.background)
        if other.position == scene.position or sum(getattr(other, a) != getattr(scene, a)
                                                   for a in ("size", "colour", "shape")) < 2:
            continue
        mine, theirs = tw.object_mask(scene), tw.object_mask(other)
        front, back = (scene, other) if rng.random() < 0.5 else (other, scene)
        front_mask, back_mask = (mine, theirs) if front is scene else (theirs, mine)
        if (back_mask & ~front_mask).sum() >= MIN_VISIBLE:
            img = tw.render(back)
            img[front_mask] = tw.COLOURS[front.colour]
            return img


def clip_rng(seed: int, index: int) -> random.Random:
    """The generator of clip `index` of a run with `seed` (any clip can be made again alone)."""
    return random.Random(f"diic/{seed}/{index}")


# Mining (from the frames only) -------------------------------------------------------------------

def look(frame) -> tuple[dict | None, str]:
    """(the reader's labels, "ok") when the frame shows exactly one clean, well-labelled instance, else (None, why)."""
    img = np.asarray(frame)
    if img.shape != (tw.CANVAS, tw.CANVAS, 3) or img.dtype != np.uint8:
        raise ValueError(f"frames must be ({tw.CANVAS}, {tw.CANVAS}, 3) uint8, got {img.shape} {img.dtype}")
    if _off_palette(img) > MAX_OFF_PALETTE:
        return None, "noise"
    f = img.astype(np.float64)
    labels = tw.read(img)
    bg = np.asarray(tw.BACKGROUNDS[labels["background"]], dtype=np.float64)
    b = tw.BORDER
    border = np.concatenate([f[:b].reshape(-1, 3), f[-b:].reshape(-1, 3), f[:, :b].reshape(-1, 3),
                             f[:, -b:].reshape(-1, 3)])
    if np.linalg.norm(np.median(border, axis=0) - bg) > BACKGROUND_DISTANCE:
        return None, "background"
    obj = np.linalg.norm(f - bg, axis=-1) > tw.OBJECT_DISTANCE
    if not obj.any():
        return None, "empty"
    if not _one_component(obj):
        return None, "components"
    if not MIN_AREA <= obj.sum() <= MAX_AREA:
        return None, "area"
    pixels = f[obj]
    median = np.median(pixels, axis=0)
    if (np.linalg.norm(median - tw.COLOURS[labels["colour"]]) > COLOUR_DISTANCE
            or (np.linalg.norm(pixels - median, axis=-1) > COLOUR_DISTANCE).mean() > MAX_OFF_COLOUR):
        return None, "colour"
    if not _fits(labels, obj):
        return None, "fit"
    return labels, "ok"


def _off_palette(img: np.ndarray) -> float:
    """The share of pixels farther than PALETTE_DISTANCE from every world colour (by distinct colour: fast)."""
    key = (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]
    uniq, counts = np.unique(key, return_counts=True)
    rgb = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], axis=-1).astype(np.float64)
    far = np.linalg.norm(rgb[:, None] - _WORLD_COLOURS, axis=-1).min(axis=1) > PALETTE_DISTANCE
    return counts[far].sum() / key.size


def _one_component(mask: np.ndarray) -> bool:
    """Is the mask one 8-connected component? (grow from one pixel inside the mask until it stops)"""
    seen = np.zeros_like(mask)
    seen[tuple(np.argwhere(mask)[0])] = True
    while True:
        rows = seen.copy()
        rows[1:] |= seen[:-1]
        rows[:-1] |= seen[1:]
        grown = rows.copy()
        grown[:, 1:] |= rows[:, :-1]
        grown[:, :-1] |= rows[:, 1:]
        grown &= mask
        if np.array_equal(grown, seen):
            return bool(np.array_equal(seen, mask))
        seen = grown


def _fits(labels: dict, obj: np.ndarray) -> bool:
    """Does the labelled object (placed by the mask's bounding box) draw the segmented mask?"""
    ys, xs = np.nonzero(obj)
    cx, cy = tw.POSITIONS[labels["position"]]
    dx = int(round((xs.min() + xs.max() + 1) / 2 - cx))
    dy = int(round((ys.min() + ys.max() + 1) / 2 - cy))
    if abs(dx) > tw.MAX_JITTER or abs(dy) > tw.MAX_JITTER:
        return False
    drawn = tw.object_mask(tw.Scene(**{a: labels[a] for a in tw.ATTRIBUTES}, dx=dx, dy=dy))
    return int((drawn != obj).sum()) <= max(3, FIT_TOLERANCE * obj.sum())


def mine(frames) -> tuple[list, list]:
    """(sequences, fates): each sequence a list of (frame index, labels), one per state, consecutive states one
    attribute apart; fates[i] is "kept" (the frame is in a track) or why frame i was dropped."""
    fates, valid = [], []
    for i, frame in enumerate(frames):
        labels, why = look(frame)
        fates.append("kept" if labels else why)
        if labels:
            valid.append((i, labels))
    kept = []
    for j, (i, labels) in enumerate(valid):  # an outlier continues neither the frame before nor the one after
        if any(_diff(labels, n[1]) <= 1 for n in valid[max(j - 1, 0):j] + valid[j + 1:j + 2]):
            kept.append((i, labels))
        else:
            fates[i] = "outlier"
    sequences = []
    for track in _tracks(kept):
        if len(track) < MIN_SEGMENT:
            for i, _ in track:
                fates[i] = "short"
            continue
        states = track[:1] + [b for a, b in zip(track, track[1:]) if b[1] != a[1]]
        if len(states) >= 2:
            sequences.append(states)
    return sequences, fates


def _tracks(kept: list) -> list:
    """Split the kept frames where more than one attribute jumps (a cut) or too many frames are missing."""
    tracks = []
    for item in kept:
        last = tracks[-1][-1] if tracks else None
        if last and _diff(last[1], item[1]) <= 1 and item[0] - last[0] <= MAX_GAP:
            tracks[-1].append(item)
        else:
            tracks.append([item])
    return tracks


def instructions(states: list) -> list[str]:
    """The edit instruction of each step of a mined sequence."""
    out = []
    for (_, a), (_, b) in zip(states, states[1:]):
        (attribute,) = tw.changed_attributes(a, b)
        out.append(tw.edit_instruction(attribute, b[attribute]))
    return out


# Scoring against the generator's ground truth ----------------------------------------------------

def score(clip: Clip, sequences: list) -> dict:
    """Emitted pairs, the right ones, distractor frames emitted, and the real single-change transitions."""
    pairs = right = 0
    emitted = {i for states in sequences for i, _ in states}
    for states in sequences:
        for (i, _), (j, _), text in zip(states, states[1:], instructions(states)):
            pairs += 1
            right += _right(clip, i, j, text)
    real = [s.attributes() for s, k in zip(clip.scenes, clip.kinds) if k == REAL]  # held states add 0
    transitions = sum(_diff(a, b) == 1 for a, b in zip(real, real[1:]))
    return {"pairs": pairs, "correct_pairs": right, "gt_transitions": transitions,
            "distractor_frames_emitted": sum(clip.kinds[i] != REAL for i in emitted)}


def _right(clip: Clip, i: int, j: int, text: str) -> bool:
    if clip.kinds[i] != REAL or clip.kinds[j] != REAL:
        return False
    attribute, value = tw.parse_edit(text)
    a, b = clip.scenes[i].attributes(), clip.scenes[j].attributes()
    return tw.changed_attributes(a, b) == [attribute] and b[attribute] == value


# Input, output -----------------------------------------------------------------------------------

def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_clip_folder(folder: str) -> list[Clip]:
    """Clips from a folder whose subfolders each hold one clip's frames as PNG files (in name order)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder (give a clip count >= 1 or a folder of clip folders)")
    clips = []
    for sub in sorted(os.listdir(folder), key=_natural):
        path = os.path.join(folder, sub)
        names = sorted((n for n in os.listdir(path) if n.lower().endswith(".png")), key=_natural) \
            if os.path.isdir(path) else []
        if names:
            clips.append(Clip([_read_png(os.path.join(path, n)) for n in names], name=sub))
    if not clips:
        raise ValueError(f"{folder}: holds no clip folders with PNG frames")
    return clips


def _read_png(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read the frame ({e})") from e
    if img.shape[:2] != (tw.CANVAS, tw.CANVAS):
        raise ValueError(f"{path}: frames must be {tw.CANVAS}x{tw.CANVAS}, got {img.shape[1]}x{img.shape[0]}")
    return img


def _clips(clips_or_count, seed: int):
    """(an iterable of clips, their count, the source's name)."""
    if isinstance(clips_or_count, (str, os.PathLike)):
        clips = read_clip_folder(os.fspath(clips_or_count))
        return clips, len(clips), os.fspath(clips_or_count)
    if isinstance(clips_or_count, int) and not isinstance(clips_or_count, bool):
        if clips_or_count < 1:
            raise ValueError(f"the clip count must be >= 1, got {clips_or_count}")
        n = clips_or_count
        return (replace(make_clip(clip_rng(seed, c)), name=f"clip{c:05d}") for c in range(n)), n, "generated"
    clips = list(clips_or_count)
    if not clips or not all(isinstance(c, Clip) for c in clips):
        raise ValueError("clips_or_count must be a clip count >= 1, a folder of clip folders or a list of Clips")
    return clips, len(clips), "clips"


def _write_atomic(path: str, text: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _save_sequence(out_dir: str, c: int, clip: Clip, states: list) -> dict:
    from PIL import Image

    folder = f"clip{c:05d}"
    os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    images = []
    for i, _ in states:
        images.append(f"{folder}/f{i:02d}.png")
        Image.fromarray(np.asarray(clip.frames[i], dtype=np.uint8)).save(os.path.join(out_dir, images[-1]))
    return {"clip": c, "name": clip.name or folder, "frames": [i for i, _ in states], "images": images,
            "instructions": instructions(states), "labels": [labels for _, labels in states]}


def run(clips_or_count, out_dir: str, seed: int = 0) -> dict:
    """Mine clips (a count to generate, a folder of PNG clips, or Clip objects) into out_dir; the summary.

    Writes out_dir/sequences.jsonl (one interleaved sequence a line), the sequences' PNGs, and summary.json.
    """
    start, out_dir = time.perf_counter(), os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder")
    clips, n, source = _clips(clips_or_count, seed)
    os.makedirs(out_dir, exist_ok=True)
    lines, fates, totals, truth = [], Counter(), Counter(), True
    by_attribute = Counter()
    for c, clip in enumerate(clips):
        sequences, clip_fates = mine(clip.frames)
        fates.update(clip_fates)
        for states in sequences:
            record = _save_sequence(out_dir, c, clip, states)
            by_attribute.update(tw.parse_edit(t)[0] for t in record["instructions"])
            lines.append(json.dumps(record) + "\n")
        if clip.kinds is None:
            truth = False
        else:
            totals.update(score(clip, sequences))
            totals["distractor_frames"] += sum(k != REAL for k in clip.kinds)
    _write_atomic(os.path.join(out_dir, "sequences.jsonl"), "".join(lines))
    pairs = sum(by_attribute.values())
    summary = {
        "source": source, "seed": seed, "clips": n, "frames": sum(fates.values()), "frames_kept": fates["kept"],
        "dropped": {k: v for k, v in sorted(fates.items()) if k != "kept"}, "sequences": len(lines),
        "images": pairs + len(lines), "pairs": pairs, "pairs_by_attribute": dict(sorted(by_attribute.items())),
        "distractor_frames": totals["distractor_frames"] if truth else None,
        "distractor_frames_emitted": totals["distractor_frames_emitted"] if truth else None,
        "correct_pairs": totals["correct_pairs"] if truth else None,
        "gt_transitions": totals["gt_transitions"] if truth else None,
        "precision": round(totals["correct_pairs"] / pairs, 6) if truth and pairs else None,
        "yield": round(pairs / totals["gt_transitions"], 6) if truth and totals["gt_transitions"] else None,
        "seconds": round(time.perf_counter() - start, 3), "out": out_dir,
    }
    _write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary
