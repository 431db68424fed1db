"""Token layout: added-token ids from the files, legacy slow-tokenizer rules, the chat template."""
import json
import os

import pytest

from wegen import loading, prompting


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return prompting.WeGenTokenizer(os.path.join(tiny_ckpt, loading.TOKENIZER_DIR))


def test_added_token_ids_come_from_added_tokens_json(tok, tiny_ckpt):
    with open(os.path.join(tiny_ckpt, loading.TOKENIZER_DIR, "added_tokens.json")) as f:
        added = json.load(f)
    assert len(added) == 330
    ids = tok.image_token_ids(64)
    assert ids.start == added["<img>"] and ids.end == added["</img>"]
    assert ids.slots == tuple(added[f"<img_{k:05d}>"] for k in range(64))
    assert tok.vocab_size == tok.sp_size + 330
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_image_block_is_66_tokens_in_order(tok):
    ids = tok.encode(prompting.image_block(64))
    image_ids = tok.image_token_ids(64)
    assert ids == [image_ids.start, *image_ids.slots, image_ids.end]


def test_legacy_rules_strip_spaces_next_to_added_tokens_and_prefix_each_chunk(tok):
    # "x </img> y": spaces around </img> are dropped, "y" is encoded as its own chunk with the dummy prefix
    ids = tok.encode("cat </img>  dog")
    end = tok.token_id("</img>")
    i = ids.index(end)
    assert ids[:i] == tok.sp.encode("cat") and ids[i + 1:] == tok.sp.encode("dog")
    assert tok.sp.id_to_piece(ids[i + 1]).startswith("\u2581")


def test_t2i_prompt_matches_release_template(tok):
    ids = prompting.prompt_ids(tok, [prompting.Turn("a red fox")], 64, "generate")
    assert ids[0] == tok.bos_id
    assert ids[1:] == tok.sp.encode("[INST] Generate a painting: a red fox [/INST]\n")
    forced = prompting.prompt_ids(tok, [prompting.Turn("a red fox")], 64, "generate", force_image=True)
    assert forced == ids + [tok.token_id("<img>")]  # the "\n" before <img> is kept


def test_multi_turn_follows_seedx_convention():
    turns = [prompting.Turn("u1", reply="a1", reply_images=1), prompting.Turn("u2", user_images=1)]
    text = prompting.conversation_text(turns, 2, "generate")
    block = prompting.image_block(2)
    assert text == f"[INST] u1 [/INST]\na1{block}\n[INST] {block}u2 [/INST]\n"


def test_image_slot_positions_and_decode(tok):
    ids = prompting.prompt_ids(tok, [prompting.Turn("look", user_images=2)], 64, "chat")
    starts = prompting.image_slot_positions(ids, tok.image_token_ids(64))
    assert len(starts) == 2 and starts[1] - starts[0] == 66
    assert tok.decode(tok.encode("a red fox")) == "a red fox"
    assert prompting.clean_reply("<img_00001>Here's a painting.</img>  ") == "Here's a painting."


def test_bad_task_and_missing_tokenizer_files(tmp_path):
    with pytest.raises(ValueError, match="task must be"):
        prompting.user_message("x", 0, 64, "paint")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        prompting.WeGenTokenizer(str(tmp_path))
