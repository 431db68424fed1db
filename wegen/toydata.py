"""Training data of the shapes world: rendered batches, and the conversations stage 2 learns from.

A conversation is a list of turns in the engine's own template (wegen.prompting): the user's text and
input images, then the reply (text, or one generated image). Token ids are built by the same
`prompt_ids` the engine uses at inference, so training sees exactly the prompts a user's call makes.
Images are referred to, not held: ("real", i) is the tower's features of a rendered or mined frame,
("scene", k) the features of scene k averaged over its jitter (the generation target: what a
description or an edit determines; the jitter is left to the decoder's seed).

Tasks (the release's stage-2 mix, on the toy world): text-to-image, understanding ("describe the
image"), Prompt Self-Rewriting (partial -> full description, with the engine's rewrite template),
and DIIC edits, single-turn (reference image + instruction) and multi-turn in SEED-X's chat template.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from . import toyworld as W
from .prompting import GENERATE_PREFIX, IMG_END, IMG_START, Turn, img_slot_token, prompt_ids

SCENES = W.all_scenes()
SCENE_INDEX = {s: i for i, s in enumerate(SCENES)}


def scene_index(attrs) -> int:
    """Index in SCENES of a Scene or an attribute dict (jitter ignored)."""
    if isinstance(attrs, W.Scene):
        attrs = attrs.attributes()
    return SCENE_INDEX[W.Scene(**{a: attrs[a] for a in W.ATTRIBUTES})]


def render_batch(scenes) -> np.ndarray:
    """(B, 64, 64, 3) uint8."""
    return np.stack([W.render(s) for s in scenes])


def to_pixels(images: np.ndarray):
    """uint8 (B, H, W, 3) -> float32 torch (B, H, W, 3) in 0..1 (ComfyUI's IMAGE layout)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0


def jitters() -> list[tuple[int, int]]:
    r = range(-W.MAX_JITTER, W.MAX_JITTER + 1)
    return [(dx, dy) for dx in r for dy in r]


# Conversations -----------------------------------------------------------------------------------

@dataclass
class Conversation:
    """Turns (replies may hold one image) and the image refs of every block, in prompt order."""

    turns: list[Turn]
    blocks: list[tuple[str, int]] = field(default_factory=list)  # ("real", i) or ("scene", k)
    generated: list[bool] = field(default_factory=list)  # per block: a reply image (regression target)
    reply_text: str | None = None  # the last turn's text reply (None: the last reply is an image)
    task: str = ""


def t2i(rng: random.Random) -> Conversation:
    scene = rng.choice(SCENES)
    turn = Turn(user=GENERATE_PREFIX + W.describe(scene), reply_images=1)
    return Conversation([turn], [("scene", SCENE_INDEX[scene])], [True], task="t2i")


def understand(rng: random.Random, n_real: int, real_scene: list[int]) -> Conversation:
    i = rng.randrange(n_real)
    turn = Turn(user=W.QUESTION, user_images=1)
    return Conversation([turn], [("real", i)], [False], reply_text=W.describe(SCENES[real_scene[i]]),
                        task="understand")


def rewrite(rng: random.Random, template: str) -> Conversation:
    """A partial description -> one full description that keeps it (the missing attributes drawn uniformly)."""
    from .rewrite import build_request

    scene = rng.choice(SCENES)
    given = W.random_partial(rng, scene, 0, 4)
    turn = Turn(user=build_request(template, W.describe(given)))
    return Conversation([turn], [], [], reply_text=W.describe(scene), task="rewrite")


def edit_chain(rng: random.Random, sequence: dict, real_ids: list[int], max_turns: int = 3,
               p_text_first: float = 0.5, p_canonical_input: float = 0.3) -> Conversation:
    """A window of a DIIC sequence as a chat: the first image from a description (a generated reply) or as
    the user's input image, then one turn per instruction, each replying with the next image."""
    labels, instructions = sequence["labels"], sequence["instructions"]
    n_edits = rng.randint(1, min(max_turns - 1, len(instructions)))
    start = rng.randrange(len(instructions) - n_edits + 1)
    first = scene_index(labels[start])
    turns, blocks, generated = [], [], []
    if rng.random() < p_text_first:
        turns.append(Turn(user=GENERATE_PREFIX + W.describe(SCENES[first]), reply_images=1))
        blocks.append(("scene", first))
        generated.append(True)
        pending_images = 0
    else:
        use_real = rng.random() >= p_canonical_input
        blocks.append(("real", real_ids[start]) if use_real else ("scene", first))
        generated.append(False)
        pending_images = 1
    for k in range(start, start + n_edits):
        turns.append(Turn(user=instructions[k], user_images=pending_images, reply_images=1))
        blocks.append(("scene", scene_index(labels[k + 1])))
        generated.append(True)
        pending_images = 0
    return Conversation(turns, blocks, generated, task="edit" if len(turns) == 1 else "chat")


# Token ids ---------------------------------------------------------------------------------------

@dataclass
class Tokenized:
    ids: list[int]
    loss_mask: list[bool]  # positions whose NEXT token is a cross-entropy target
    slot_starts: list[int]  # first slot position of each image block, prompt order


def tokenize(conv: Conversation, tokenizer, n_slots: int) -> Tokenized:
    """The prompt exactly as the engine builds it, then the last reply (its image block or its text) + EOS."""
    *history, last = conv.turns
    prompt_turns = history + [Turn(user=last.user, user_images=last.user_images)]
    ids = prompt_ids(tokenizer, prompt_turns, n_slots, task="chat")
    n_prompt = len(ids)
    if conv.reply_text is None:
        ids += [tokenizer.token_id(IMG_START)] + [tokenizer.token_id(img_slot_token(k)) for k in range(n_slots)]
        ids += [tokenizer.token_id(IMG_END)]
    else:
        ids += tokenizer.encode(conv.reply_text)
    ids.append(tokenizer.eos_id)
    slots = {tokenizer.token_id(img_slot_token(k)) for k in range(n_slots)}
    # position p predicts ids[p + 1]: targets are the reply's tokens, except the forced slots
    loss_mask = [p + 1 >= n_prompt and ids[p + 1] not in slots for p in range(len(ids) - 1)] + [False]
    from .prompting import image_slot_positions

    starts = image_slot_positions(ids, tokenizer.image_token_ids(n_slots))
    assert len(starts) == len(conv.blocks), f"{len(starts)} image blocks in the ids, {len(conv.blocks)} refs"
    return Tokenized(ids, loss_mask, starts)
