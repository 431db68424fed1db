"""`python -m wegen eval-toy`: what a WeGen checkpoint delivers on the shapes world (shared/TOYWORLD.md).

Every figure goes through the engine's public path, as a user's call would: WeGenEngine.generate /
understand / reconstruct, chat.chat_turn on sessions in a temporary folder, rewrite.rewrite_prompt and
diic.run. Every call uses the checkpoint's recommended settings (engine.recommended: steps, cfg, width,
height, feature_slice) and its own seed, drawn from --seed: a run is deterministic for a seed (on one
device, dtype and CPU thread count). Pictures are judged by toyworld.read, texts by parse_description.

Figures (fractions 0..1 unless said; `all_five`: every attribute right; N = --n):
  t2i.*          N full descriptions -> engine.generate (batched) -> each attribute, all five.
  edit.*         N chat sessions: turn 1 a full description (picture A), turn 2 one random single-attribute
                 edit (picture B). change_made: B reads the new value; others_kept: every other attribute of B
                 reads as A did (what the user saw and liked; "no object" never counts as kept); kept.<attr>:
                 that attribute kept, over the edits of another one.
  chain.*        the same sessions' turn 3, an edit of another attribute (e.g. recolour, then move): the
                 picture against the scene with both edits applied.
  understand.*   N rendered (jittered) scenes + QUESTION: valid (a full description), each attribute, all five.
  reconstruct.*  N rendered scenes -> engine.reconstruct -> each attribute, all five.
  rewrite.*      max(1, N // 2) partial descriptions (1-3 attributes) -> 6 rewrites each: valid, keeps_given
                 (every given attribute kept), distinct_of_6 (mean count of distinct full descriptions, 0..6),
                 t2i_all_five (engine.generate of each valid rewrite reads all five right). A call that
                 raises (fewer than 6 distinct rewrites) counts as 6 invalid rewrites.
  diic.*         precision and yield of the DIIC stand-in on N fresh clips.
A figure with nothing to count (no valid rewrite, no mined pair) is None, and None fails any floor above 0.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections import Counter

import numpy as np

from . import chat, diic, rewrite
from . import toyworld as tw
from .rules import check_seed

BATCH = 16  # prompts / images per batched engine call
REWRITES = 6  # rewrites per partial description
MAX_TEXT_TOKENS = 48  # reply budget of understanding and rewrites: a full description is ~12 tokens
MAX_N = 100_000
SETTING_KEYS = ("steps", "cfg", "width", "height", "feature_slice")


def _attribute_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{a}" for a in tw.ATTRIBUTES] + [f"{prefix}.all_five"]


FIGURES = (*_attribute_keys("t2i"), "edit.change_made", "edit.others_kept",
           *(f"edit.kept.{a}" for a in tw.ATTRIBUTES), *_attribute_keys("chain"), "understand.valid",
           *_attribute_keys("understand"), *_attribute_keys("reconstruct"), "rewrite.valid", "rewrite.keeps_given",
           "rewrite.distinct_of_6", "rewrite.t2i_all_five", "diic.precision", "diic.yield")
# CI floors (`eval-toy --floors`): a little under what the shipped wegen-toy measured at --n 12 --seed 0 (README's
# model card has the --n 50 figures); a figure not named here has floor 0.
FLOORS = {**dict.fromkeys(FIGURES, 0.0),
          "t2i.size": 0.8, "t2i.colour": 0.8, "t2i.shape": 0.45, "t2i.position": 0.85, "t2i.background": 0.85,
          "t2i.all_five": 0.45, "edit.change_made": 0.7, "edit.others_kept": 0.2, "edit.kept.position": 0.8,
          "edit.kept.background": 0.8, "chain.position": 0.6, "chain.background": 0.7,
          **dict.fromkeys(_attribute_keys("understand"), 0.9), "understand.valid": 0.9,
          "reconstruct.size": 0.8, "reconstruct.colour": 0.8, "reconstruct.shape": 0.6, "reconstruct.position": 0.85,
          "reconstruct.background": 0.85, "reconstruct.all_five": 0.6, "rewrite.valid": 0.85,
          "rewrite.keeps_given": 0.85, "rewrite.distinct_of_6": 5.0, "rewrite.t2i_all_five": 0.3,
          "diic.precision": 0.99, "diic.yield": 0.9}


class _Tally:
    """Sums and counts per figure key; a figure is sum / count (None when nothing was counted)."""

    def __init__(self):
        self.sums, self.counts = Counter(), Counter()

    def add(self, key: str, value):
        self.sums[key] += float(value)
        self.counts[key] += 1

    def add_read(self, prefix: str, read: dict | None, wanted: dict):
        """Per attribute and all five: `read` (None: nothing readable) against the `wanted` attributes."""
        ok = [(read or {}).get(a) == wanted[a] for a in tw.ATTRIBUTES]
        for a, right in zip(tw.ATTRIBUTES, ok):
            self.add(f"{prefix}.{a}", right)
        self.add(f"{prefix}.all_five", all(ok))

    def value(self, key: str):
        return round(self.sums[key] / self.counts[key], 4) if self.counts[key] else None


# Inputs and settings -------------------------------------------------------------------------------

def check_inputs(n, seed, json_path=None, checkpoint=None, device=None):
    """ValueError (one line) for a bad count, seed, device, checkpoint or --json path; nothing is run."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ValueError(f"--n must be an integer in 1..{MAX_N}, got {n!r}")
    check_seed(seed, "--seed")
    if device is not None:
        _check_device(device)
    if checkpoint is not None:
        _check_checkpoint(checkpoint)
    if json_path is not None:  # last: it creates the folder
        from .images import check_writable

        check_writable(json_path)


def _check_checkpoint(checkpoint: str):
    from . import loading

    if checkpoint == "wegen-toy" and "wegen-toy" not in loading.bundled_checkpoints() \
            and not os.path.isdir(checkpoint):
        raise ValueError(f"the toy checkpoint is not in {loading.BUNDLED_DIR} yet: train and export it "
                         f"(`python -m wegen train-toy`) or give --checkpoint DIR")
    loading.resolve_checkpoint(checkpoint)


def _check_device(device: str):
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")


def settings_of(engine) -> dict:
    """The checkpoint's recommended steps, cfg, width, height, feature_slice: every call runs with them."""
    return {k: engine.recommended[k] for k in SETTING_KEYS}


def _decode_kwargs(s: dict) -> dict:
    return {k: s[k] for k in ("steps", "cfg", "width", "height")}


def _rng(seed: int, figure: str) -> random.Random:
    """One stream per figure (str seeds hash with sha512: the same on every run)."""
    return random.Random(f"wegen-toyeval:{seed}:{figure}")


def _seed(rng: random.Random) -> int:
    return rng.randrange(2 ** 32)


def _pixels(images: list):
    """uint8 (64, 64, 3) pictures -> float32 (B, 64, 64, 3) in 0..1 (the engine's image layout)."""
    import torch

    return torch.from_numpy(np.stack(images)).float() / 255.0


def _read_all(images) -> list[dict]:
    return [tw.read(img.numpy()) for img in images]


def _generate(engine, prompts: list[str], seeds: list[int], s: dict) -> list[dict]:
    """engine.generate in batches of BATCH (one seed per prompt) -> what each picture reads."""
    reads = []
    for i in range(0, len(prompts), BATCH):
        images, _ = engine.generate(prompts[i:i + BATCH], seed=seeds[i:i + BATCH], feature_slice=s["feature_slice"],
                                    **_decode_kwargs(s))
        reads += _read_all(images)
    return reads


# Figures --------------------------------------------------------------------------------------------

def eval_t2i(engine, n: int, rng: random.Random, s: dict, tally: _Tally):
    scenes = [tw.random_scene(rng) for _ in range(n)]
    seeds = [_seed(rng) for _ in scenes]
    for scene, read in zip(scenes, _generate(engine, [tw.describe(sc) for sc in scenes], seeds, s)):
        tally.add_read("t2i", read, scene.attributes())


def _other_edit(rng: random.Random, scene: tw.Scene, not_attribute: str) -> tuple[str, str]:
    attribute = rng.choice([a for a in tw.ATTRIBUTES if a != not_attribute])
    return attribute, rng.choice([v for v in tw.CHOICES[attribute] if v != getattr(scene, attribute)])


def chain_items(n: int, rng: random.Random) -> list[dict]:
    """Per session: the scene, two edits of different attributes, the scene after each, a seed per turn."""
    items = []
    for _ in range(n):
        scene = tw.random_scene(rng, jitter=False)
        first = tw.random_edit(rng, scene)
        after_first = tw.apply_edit(scene, *first)
        second = _other_edit(rng, after_first, first[0])
        items.append(dict(scene=scene, edits=[first, second], after=[after_first, tw.apply_edit(after_first, *second)],
                          seeds=[_seed(rng) for _ in range(3)], reads=[]))
    return items


def _turn(engine, root: str, k: int, item: dict, message: str, s: dict) -> dict:
    seed = item["seeds"][len(item["reads"])]
    result = chat.chat_turn(engine, root, f"item{k:05d}", message, seed=seed, **_decode_kwargs(s),
                            feature_slice=s["feature_slice"])
    item["reads"].append(tw.read(result.image[0].numpy()))
    return item["reads"][-1]


def eval_edits(engine, items: list, root: str, s: dict, tally: _Tally):
    """Turns 1 and 2 of every session: change made, others kept (against picture A as read)."""
    for k, item in enumerate(items):
        a = _turn(engine, root, k, item, tw.describe(item["scene"]), s)
        attribute, value = item["edits"][0]
        b = _turn(engine, root, k, item, tw.edit_instruction(attribute, value), s)
        tally.add("edit.change_made", b[attribute] == value)
        kept = {x: a[x] is not None and b[x] == a[x] for x in tw.ATTRIBUTES if x != attribute}
        for x, ok in kept.items():
            tally.add(f"edit.kept.{x}", ok)
        tally.add("edit.others_kept", all(kept.values()))


def eval_chains(engine, items: list, root: str, s: dict, tally: _Tally):
    """Turn 3 of every session (the second edit): all five against the scene with both edits applied."""
    for k, item in enumerate(items):
        c = _turn(engine, root, k, item, tw.edit_instruction(*item["edits"][1]), s)
        tally.add_read("chain", c, item["after"][1].attributes())


def eval_understand(engine, n: int, rng: random.Random, tally: _Tally):
    for _ in range(n):
        scene = tw.random_scene(rng)
        reply = engine.understand(_pixels([tw.render(scene)]), tw.QUESTION, max_new_tokens=MAX_TEXT_TOKENS,
                                  seed=_seed(rng))
        parsed = tw.parse_description(reply)
        tally.add("understand.valid", tw.is_full(parsed))
        tally.add_read("understand", parsed, scene.attributes())


def eval_reconstruct(engine, n: int, rng: random.Random, s: dict, tally: _Tally):
    scenes = [tw.random_scene(rng) for _ in range(n)]
    seeds = [_seed(rng) for _ in scenes]
    for i in range(0, n, BATCH):
        out = engine.reconstruct(_pixels([tw.render(sc) for sc in scenes[i:i + BATCH]]), seed=seeds[i:i + BATCH],
                                 **_decode_kwargs(s))
        for scene, read in zip(scenes[i:i + BATCH], _read_all(out)):
            tally.add_read("reconstruct", read, scene.attributes())


def _rewrites(engine, given: dict, seed: int) -> list[str]:
    """rewrite_prompt's REWRITES prompts; [] when the call gives up (it raises ValueError)."""
    try:
        return rewrite.rewrite_prompt(engine, tw.describe(given), REWRITES, seed=seed,
                                      max_new_tokens=MAX_TEXT_TOKENS).prompts
    except ValueError:
        return []


def _score_rewrites(prompts: list[str], given: dict, tally: _Tally) -> list[tuple[str, dict]]:
    """valid / keeps_given per rewrite (missing ones count as invalid), distinct per call; the valid ones."""
    parsed = [tw.parse_description(p) for p in prompts] + [None] * (REWRITES - len(prompts))
    valid = []
    for text, attrs in zip(prompts + [""] * REWRITES, parsed):
        tally.add("rewrite.valid", tw.is_full(attrs))
        tally.add("rewrite.keeps_given", attrs is not None and all(attrs[a] == v for a, v in given.items() if v))
        if tw.is_full(attrs):
            valid.append((text, attrs))
    tally.add("rewrite.distinct_of_6", len({tuple(attrs[a] for a in tw.ATTRIBUTES) for _, attrs in valid}))
    return valid


def eval_rewrites(engine, n: int, rng: random.Random, s: dict, tally: _Tally):
    valid = []
    for _ in range(max(1, n // 2)):
        given = tw.random_partial(rng, tw.random_scene(rng), 1, 3)
        valid += _score_rewrites(_rewrites(engine, given, _seed(rng)), given, tally)
    seeds = [_seed(rng) for _ in valid]
    for (_, attrs), read in zip(valid, _generate(engine, [t for t, _ in valid], seeds, s)):
        tally.add("rewrite.t2i_all_five", all(read[a] == attrs[a] for a in tw.ATTRIBUTES))


def eval_diic(n: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="wegen-toyeval-diic-") as out:
        summary = diic.run(n, out, seed=seed)
    return {"diic.precision": summary["precision"], "diic.yield": summary["yield"], "diic.pairs": summary["pairs"]}


# The whole evaluation -----------------------------------------------------------------------------

def run_eval(engine, n: int = 50, seed: int = 0, log=None) -> dict:
    """Every figure on `engine` (its recommended settings), N items each; the result dict (module docstring)."""
    check_inputs(n, seed)
    s, tally, seconds = settings_of(engine), _Tally(), {}
    log = log or (lambda line: None)

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        seconds[name] = round(time.perf_counter() - start, 2)
        log(f"{name}: {seconds[name]:.1f} s")
        return out

    start = time.perf_counter()
    timed("t2i", eval_t2i, engine, n, _rng(seed, "t2i"), s, tally)
    items = chain_items(n, _rng(seed, "chain"))
    with tempfile.TemporaryDirectory(prefix="wegen-toyeval-chat-") as root:
        timed("edit", eval_edits, engine, items, root, s, tally)
        timed("chain", eval_chains, engine, items, root, s, tally)
    timed("understand", eval_understand, engine, n, _rng(seed, "understand"), tally)
    timed("reconstruct", eval_reconstruct, engine, n, _rng(seed, "reconstruct"), s, tally)
    timed("rewrite", eval_rewrites, engine, n, _rng(seed, "rewrite"), s, tally)
    mined = timed("diic", eval_diic, n, seed)
    figures = {k: tally.value(k) for k in FIGURES if not k.startswith("diic.")}
    figures.update({k: mined[k] for k in ("diic.precision", "diic.yield")})
    counts = {k: tally.counts[k] for k in FIGURES if not k.startswith("diic.")}
    counts.update({"diic.precision": mined["diic.pairs"], "diic.yield": n})
    return {"checkpoint": _checkpoint_name(engine), "n": n, "seed": seed, "device": str(getattr(engine, "device", "")),
            "dtype": str(getattr(engine, "dtype", "")).replace("torch.", ""), "settings": s,
            "figures": {k: figures[k] for k in FIGURES}, "counts": {k: counts[k] for k in FIGURES},
            "seconds": seconds, "total_seconds": round(time.perf_counter() - start, 2)}


def _checkpoint_name(engine) -> str:
    report = getattr(engine, "report", None)
    return str(getattr(report, "root", "")) if report is not None else ""


# Floors, output -------------------------------------------------------------------------------------

def check_floors(result: dict, floors: dict) -> list[str]:
    """`figure value < floor` for each figure below its floor (a missing or None figure: below any floor > 0)."""
    figures = result.get("figures", result)
    below = []
    for key, floor in floors.items():
        value = figures.get(key)
        if _below(value, floor):
            below.append(f"{key} {'n/a' if value is None else f'{value:.3f}'} < {floor:.3f}")
    return below


def _below(value, floor) -> bool:
    return floor is not None and (value < floor if value is not None else floor > 0)


def format_table(result: dict, floors: dict | None = None) -> str:
    """A readable table: figure, value, how many it counts, floor (`<` marks a figure below it), then timings."""
    floors = FLOORS if floors is None else floors
    s = result["settings"]
    lines = [f"WeGen toy eval: {result['checkpoint']} n={result['n']} seed={result['seed']} on {result['device']} "
             f"({result['dtype']}): steps {s['steps']}, cfg {s['cfg']}, {s['width']}x{s['height']}, "
             f"feature_slice {s['feature_slice']}",
             f"{'figure':<24} {'value':>7} {'of':>6} {'floor':>7}"]
    for key, value in result["figures"].items():
        floor = floors.get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"{key:<24} {shown:>7} {result['counts'][key]:>6} "
                     f"{'' if floor is None else f'{floor:.3f}':>7}{' <' if _below(value, floor) else ''}")
    times = ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items())
    lines.append(f"seconds: {times}; total {result['total_seconds']:.1f}")
    return "\n".join(lines)


def write_json(path: str, result: dict):
    """The result as JSON, written atomically (a temporary file in the same folder, then renamed)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
