"""The toy's stage-2 conversations (wegen.toydata): they tokenize as the engine's own prompts (generate, understand,
rewrite, chat edits), edit chains follow the mined DIIC sequences."""
import json
import os
import random

import pytest

from wegen import diic, toydata
from wegen import toyworld as W
from wegen.prompting import GENERATE_PREFIX, IMG_END, IMG_START, image_slot_positions, img_slot_token

SEED = 0


class _Captured(Exception):
    def __init__(self, ids):
        self.ids = ids


@pytest.fixture
def capture(engine, monkeypatch):
    """prompt(fn) -> the ids the engine's MLLM decode would have been given by fn() (nothing is decoded)."""

    def fake_decode(rows_ids, *args, **kwargs):
        raise _Captured(list(rows_ids[0]))

    def prompt(fn):
        with monkeypatch.context() as mp:
            mp.setattr(engine, "generate_tokens", fake_decode)
            with pytest.raises(_Captured) as e:
                fn()
        return e.value.ids

    return prompt


def _check_tokenized(conv, tok, engine_prompt, tokenizer):
    """ids = the engine's prompt then the reply; the mask covers exactly the reply (not its forced slots)."""
    image_ids = tokenizer.image_token_ids(64)
    ids, mask = tok.ids, tok.loss_mask
    assert len(mask) == len(ids) and mask[-1] is False
    if conv.reply_text is None:
        assert engine_prompt[-1] == image_ids.start  # force_image: the engine's prompt ends with <img>
        n_prompt = len(engine_prompt) - 1
        reply = [image_ids.start, *image_ids.slots, image_ids.end, tokenizer.eos_id]
        targets = [image_ids.start, image_ids.end, tokenizer.eos_id]
    else:
        n_prompt = len(engine_prompt)
        reply = tokenizer.encode(conv.reply_text) + [tokenizer.eos_id]
        targets = reply
    assert ids[:len(engine_prompt)] == engine_prompt
    assert ids[n_prompt:] == reply
    masked = [p for p, m in enumerate(mask) if m]
    assert masked[0] == n_prompt - 1
    assert [ids[p + 1] for p in masked] == targets
    assert tok.slot_starts == image_slot_positions(ids, image_ids)
    assert len(tok.slot_starts) == len(conv.blocks) == len(conv.generated) == ids.count(image_ids.start)
    for s in tok.slot_starts:
        assert ids[s - 1] == image_ids.start and tuple(ids[s:s + 64]) == image_ids.slots


def test_t2i_is_the_engines_generate_prompt(engine, capture):
    tokenizer = engine.tokenizer
    for seed in range(3):
        conv = toydata.t2i(random.Random(seed))
        assert conv.turns[0].user.startswith(GENERATE_PREFIX) and conv.generated == [True]
        description = conv.turns[0].user[len(GENERATE_PREFIX):]
        assert W.parse_description(description) == toydata.SCENES[conv.blocks[0][1]].attributes()
        prompt = capture(lambda: engine.encode(description))
        _check_tokenized(conv, toydata.tokenize(conv, tokenizer, 64), prompt, tokenizer)


def test_understanding_is_the_engines_understand_prompt(engine, capture):
    tokenizer = engine.tokenizer
    real_scene = [3, 500, 971]
    conv = toydata.understand(random.Random(1), 3, real_scene)
    (kind, i), = conv.blocks
    assert kind == "real" and conv.generated == [False]
    assert conv.reply_text == W.describe(toydata.SCENES[real_scene[i]])
    image = toydata.to_pixels(toydata.render_batch([toydata.SCENES[real_scene[i]]]))
    prompt = capture(lambda: engine.understand(image, W.QUESTION))
    _check_tokenized(conv, toydata.tokenize(conv, tokenizer, 64), prompt, tokenizer)


def test_rewrite_is_the_engines_rewrite_prompt(engine, capture):
    from wegen.rewrite import DEFAULT_TEMPLATE, PLACEHOLDER, rewrite_prompt

    tokenizer = engine.tokenizer
    head, tail = DEFAULT_TEMPLATE.split(PLACEHOLDER)
    for seed in range(3):
        conv = toydata.rewrite(random.Random(seed), DEFAULT_TEMPLATE)
        user = conv.turns[0].user
        assert user.startswith(head) and user.endswith(tail) and conv.blocks == []
        given = user[len(head):len(user) - len(tail)]
        full = W.parse_description(conv.reply_text)
        assert W.is_full(full)
        assert all(full[a] == v for a, v in W.parse_description(given).items() if v is not None)
        prompt = capture(lambda: rewrite_prompt(engine, given, 1))
        _check_tokenized(conv, toydata.tokenize(conv, tokenizer, 64), prompt, tokenizer)


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("diic"))
    diic.run(5, folder, seed=SEED)
    with open(os.path.join(folder, "sequences.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _chain(sequence, seed, **kw):
    real_ids = [1000 + i for i in range(len(sequence["images"]))]
    return toydata.edit_chain(random.Random(seed), sequence, real_ids, **kw), real_ids


def test_edit_chains_follow_the_mined_sequences(sequences):
    kinds = set()
    for seq in sequences:
        assert len(seq["labels"]) == len(seq["images"]) == len(seq["instructions"]) + 1
        for seed in range(6):
            conv, real_ids = _chain(seq, seed)
            kinds.add((conv.task, conv.blocks[0][0], conv.generated[0]))
            assert len(conv.turns) <= 3 and conv.generated[-1] and all(conv.generated[1:])
            assert len(conv.blocks) == sum(t.user_images + t.reply_images for t in conv.turns)
            scenes = [toydata.SCENES[i] if kind == "scene" else
                      toydata.SCENES[toydata.scene_index(seq["labels"][real_ids.index(i)])]
                      for kind, i in conv.blocks]
            edits = [t.user for t in conv.turns if not t.user.startswith(GENERATE_PREFIX)]
            assert len(edits) == len(scenes) - 1
            for before, instruction, after in zip(scenes, edits, scenes[1:]):
                assert W.apply_edit(before, *W.parse_edit(instruction)) == after, (instruction, before, after)
            if conv.turns[0].user.startswith(GENERATE_PREFIX):
                assert W.parse_description(conv.turns[0].user[len(GENERATE_PREFIX):]) == scenes[0].attributes()
    assert {c[1] for c in kinds} == {"real", "scene"} and {c[0] for c in kinds} >= {"edit", "chat"}


def test_edit_turns_are_the_chat_prompts(engine, capture, sequences, tmp_path):
    """Single-turn edits (an input image) and multi-turn chains (history of generated images) tokenize as
    wegen.chat builds the prompt of the turn, with the session's earlier turns really run."""
    from wegen import chat

    tokenizer = engine.tokenizer
    seq = sequences[0]
    image_of = {("real", 1000 + i): toydata.SCENES[toydata.scene_index(lab)] for i, lab in enumerate(seq["labels"])}

    def pixels(ref):
        scene = image_of.get(ref) or toydata.SCENES[ref[1]]
        return toydata.to_pixels(toydata.render_batch([scene]))

    cases = [_chain(seq, 0, max_turns=2, p_text_first=0.0)[0],  # reference image + instruction
             _chain(seq, 1, max_turns=3, p_text_first=1.0)[0],  # description, then edits
             _chain(seq, 2, max_turns=3, p_text_first=0.0, p_canonical_input=0.0)[0]]
    assert cases[0].task == "edit" and cases[1].task == "chat" and len(cases[1].turns) >= 2
    for n, conv in enumerate(cases):
        root, name = str(tmp_path / f"s{n}"), "t"
        refs = iter(conv.blocks)
        *history, last = conv.turns
        for turn in history:  # earlier turns: real chat turns (the tiny model decodes, 1 step)
            images = pixels(next(refs)) if turn.user_images else None
            message = turn.user[len(GENERATE_PREFIX):] if turn.user.startswith(GENERATE_PREFIX) else turn.user
            result = chat.chat_turn(engine, root, name, message, images, steps=1, width=64, height=64)
            assert result.reply == ""
            next(refs)  # the reply's image
        images = pixels(next(refs)) if last.user_images else None
        prompt = capture(lambda: chat.chat_turn(engine, root, name, last.user, images, steps=1, width=64, height=64))
        _check_tokenized(conv, toydata.tokenize(conv, tokenizer, 64), prompt, tokenizer)


def test_tokenize_refuses_refs_that_do_not_match_the_image_blocks(engine):
    conv = toydata.t2i(random.Random(0))
    conv.blocks, conv.generated = [], []
    with pytest.raises(AssertionError, match="1 image blocks in the ids, 0 refs"):
        toydata.tokenize(conv, engine.tokenizer, 64)


def test_tokenize_t2i_by_hand(engine):
    """Independent of the engine: BOS [INST] Generate a painting: ... [/INST]\\n <img> slots </img> EOS."""
    tokenizer = engine.tokenizer
    conv = toydata.t2i(random.Random(4))
    tok = toydata.tokenize(conv, tokenizer, 64)
    text = "[INST] " + conv.turns[0].user + " [/INST]\n"
    slots = [tokenizer.token_id(img_slot_token(k)) for k in range(64)]
    assert tok.ids == ([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.token_id(IMG_START)] + slots +
                       [tokenizer.token_id(IMG_END), tokenizer.eos_id])
    assert sum(tok.loss_mask) == 3 and tok.slot_starts == [len(tokenizer.encode(text)) + 2]
