"""Chat memory on the tiny checkpoint: sessions on disk, prefix KV reuse against a full recompute,
consistency-aware decoding (bit-identical pixels outside the mask), nothing lost on failure, the
cross-process lock, the `chat` command."""
import html
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from faults import folder_state

from wegen import chat, decoder, prefix_cache, prompting, sessions
from wegen.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(steps=2, width=64, height=64)
MSGS = ("a red fox in the snow", "make the sky pink", "add a full moon")



@pytest.fixture(scope="module")
def three_turns(engine, tmp_path_factory):
    """A session 'fox' with three turns, run with a fresh PrefixCache; returns (root, results, cache)."""
    root = str(tmp_path_factory.mktemp("sessions"))
    cache = prefix_cache.PrefixCache()
    results = [chat.chat_turn(engine, root, "fox", m, seed=i, prefix_cache=cache, **FAST) for i, m in enumerate(MSGS)]
    return root, results, cache


@pytest.fixture
def session_copy(three_turns, tmp_path):
    """A private copy of the three-turn session (tests may break or change it)."""
    import shutil

    root = str(tmp_path / "sessions")
    shutil.copytree(three_turns[0], root)
    return root


# Turns, persistence, resume ------------------------------------------------------------------------

def test_three_turns_are_stored_and_resume_from_disk(engine, three_turns):
    root, results, _ = three_turns
    session = sessions.load_session(root, "fox")  # a fresh read, as after a restart
    assert session.turn_ids == (1, 2, 3) and session.revision == 3
    assert [t.user for t in session.turns] == list(MSGS)
    # the first image-less turn is the release's T2I prompt; later turns are as typed
    assert session.turns[0].instruction == prompting.GENERATE_PREFIX + MSGS[0]
    assert session.turns[1].instruction == MSGS[1]
    for turn, res in zip(session.turns, results):
        assert turn.settings["seed"] == res.record.settings["seed"] and turn.settings["width"] == 64
        assert torch.equal(session.features(turn), res.features)  # exact float32 round trip
        png = session.image(turn)
        assert png.shape == (1, 64, 64, 3)
        assert (png - res.image).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG of the returned image
    # turn 3's prompt holds turns 1 and 2 with their images, in order
    ids = prompting.prompt_ids(engine.tokenizer, session.history()[:2] + [prompting.Turn(MSGS[2])], 64, "chat",
                               force_image=True)
    assert results[2].record.stats["prompt_tokens"] == len(ids)
    assert len(prompting.image_slot_positions(ids, engine.image_ids)) == 2
    text = engine.tokenizer.decode(ids)
    assert text.index(MSGS[0]) < text.index(MSGS[1]) < text.index(MSGS[2])


def test_first_turn_is_the_release_generate_path(engine, three_turns):
    _, results, _ = three_turns
    images, cond = engine.generate(MSGS[0], seed=0, **FAST)
    assert torch.equal(cond.features, results[0].features)
    assert torch.equal(images, results[0].image)


def test_prefix_reuse_equals_full_recompute(engine, three_turns, tmp_path):
    _, cached, cache = three_turns
    assert len(cache) >= 1 and 0 < cache.nbytes <= cache.max_bytes
    stats = [r.record.stats for r in cached]
    assert stats[0]["reused_tokens"] == 0
    # turn N reuses all of turn N-1's prompt but the "\n<img>" the legacy tokenizer splits differently
    assert stats[1]["reused_tokens"] >= stats[0]["prompt_tokens"] - 2
    assert stats[2]["reused_tokens"] >= stats[1]["prompt_tokens"] - 2
    root = str(tmp_path)
    for i, m in enumerate(MSGS):
        full = chat.chat_turn(engine, root, "full", m, seed=i, prefix_cache=None, **FAST)
        assert full.record.stats["reused_tokens"] == 0
        assert (full.features - cached[i].features).abs().max() <= 1e-5
        assert (full.image - cached[i].image).abs().max() <= 1e-4


def test_turn_prefills_only_new_tokens_and_reencodes_no_image(engine, session_copy, monkeypatch):
    cache = prefix_cache.PrefixCache()
    chat.chat_turn(engine, session_copy, "fox", "warm the cache", seed=5, prefix_cache=cache, **FAST)
    prefilled, encoded = [], []
    forward = engine.mllm.forward_hidden

    def spy_forward(embeds, *a, **k):
        prefilled.append(embeds.shape[1])
        return forward(embeds, *a, **k)

    def no_eva(images):
        encoded.append(images.shape[0])
        raise AssertionError("a past image was re-encoded")

    monkeypatch.setattr(engine.mllm, "forward_hidden", spy_forward)
    monkeypatch.setattr(engine, "encode_images", no_eva)
    res = chat.chat_turn(engine, session_copy, "fox", "now a crescent moon", seed=6, prefix_cache=cache, **FAST)
    st = res.record.stats
    assert encoded == [] and len(res.session.turns) == 5
    assert prefilled[0] == st["prompt_tokens"] - st["reused_tokens"] < 100  # the new turn, not the history
    assert st["prompt_tokens"] > 300


def test_input_images_and_eva_history(engine, tmp_path):
    root = str(tmp_path)
    g = torch.Generator().manual_seed(0)
    picture = torch.rand(1, 48, 40, 3, generator=g)
    first = chat.chat_turn(engine, root, "s", "a cat like this one", picture, seed=1, prefix_cache=None, **FAST)
    t = first.session.turns[0]
    assert t.instruction == "a cat like this one" and t.user_images == ("turns/000001/user_0.png",)
    blocks = first.session.features(t)
    assert blocks.shape == (2, 64, 112)
    assert torch.equal(blocks[0], engine.encode_images(picture)[0])  # the input's EVA features
    assert torch.equal(blocks[1], first.features[0])  # the generated image's features
    stored = chat.chat_turn(engine, root, "s", "bigger ears", seed=2, prefix_cache=None, **FAST)
    sessions.undo_turn(root, "s")
    calls = []
    encode = engine.encode_images
    engine.encode_images = lambda im: calls.append(im.shape) or encode(im)
    try:
        eva = chat.chat_turn(engine, root, "s", "bigger ears", seed=2, prefix_cache=None,
                             history_features="eva", **FAST)
    finally:
        del engine.encode_images
    assert calls == [(1, 64, 64, 3)]  # only the past generated image, from its PNG
    assert not torch.allclose(eva.features, stored.features)
    assert eva.record.settings["history_features"] == "eva"


# Consistency-aware decoding -------------------------------------------------------------------------

def _square_mask(size=64, lo=24, hi=40):
    mask = torch.zeros(size, size)
    mask[lo:hi, lo:hi] = 1.0
    return mask


def test_pixels_outside_mask_and_feather_are_bit_identical(engine, session_copy):
    previous = sessions.load_session(session_copy, "fox").image()  # what the turn takes as its reference
    mask = _square_mask()
    res = chat.chat_turn(engine, session_copy, "fox", "make the middle glow", seed=9, reference="auto", mask=mask,
                         strength=0.5, feather=6, prefix_cache=None, **dict(FAST, steps=4))
    assert res.record.settings["reference"] == "previous" and res.record.mask == "turns/000004/mask.png"
    weight = decoder.feather_weight(mask[None], 6)[0, 0]  # (H, W), 0 outside mask + feather
    outside = weight == 0
    assert outside.sum() > 1000 and (~outside).sum() > 256
    assert torch.equal(res.image[0][outside], previous[0][outside])
    assert not torch.equal(res.image[0][~outside], previous[0][~outside])
    stored = res.session.image()  # the saved PNG keeps the same pixels
    assert torch.equal(stored[0][outside], previous[0][outside])


def test_engine_decode_paste_back_is_bit_identical_for_any_reference(engine):
    g = torch.Generator().manual_seed(3)
    reference = torch.rand(1, 64, 64, 3, generator=g)  # not 8-bit values
    features = torch.randn(1, 64, 112, generator=g)
    mask = _square_mask(lo=8, hi=30)
    out = engine.decode_pixels(features, seed=1, steps=3, width=64, height=64, reference=reference, mask=mask[None],
                        strength=0.7, feather=5)
    outside = decoder.feather_weight(mask[None], 5)[0, 0] == 0
    assert torch.equal(out[0][outside], reference[0][outside])
    assert (out[0][~outside] != reference[0][~outside]).any()


def test_strength_without_mask_starts_from_previous_image(engine, session_copy):
    previous = sessions.load_session(session_copy, "fox").image()
    near = chat.chat_turn(engine, session_copy, "fox", "same but calmer", seed=4, strength=0.25, prefix_cache=None,
                          **dict(FAST, steps=4))
    sessions.undo_turn(session_copy, "fox")
    far = chat.chat_turn(engine, session_copy, "fox", "same but calmer", seed=4, prefix_cache=None,
                         **dict(FAST, steps=4))
    assert near.record.settings["reference"] == "previous" and far.record.settings["reference"] == "none"
    # the decoder started from the previous image's latents (the tiny VAE is random: compare with the engine)
    expected = engine.decode_pixels(near.features, seed=4, steps=4, width=64, height=64, reference=previous,
                                    strength=0.25)
    assert torch.equal(near.image, expected) and not torch.equal(near.image, far.image)


# Nothing lost ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,exc", [("denoise", RuntimeError), ("tokens", KeyboardInterrupt)])
def test_failed_or_interrupted_turn_leaves_session_byte_identical(engine, session_copy, stage, exc):
    folder = os.path.join(session_copy, "fox")
    before = folder_state(folder)

    def boom(info):
        if info["stage"] == stage and info["i"] == 2:
            raise exc("stop mid-turn")

    with pytest.raises(exc, match="stop mid-turn"):
        chat.chat_turn(engine, session_copy, "fox", "this turn fails", seed=1, reference="previous",
                       mask=_square_mask(), strength=0.5, callback=boom, **dict(FAST, steps=6))  # 3 denoise steps
    assert folder_state(folder) == before
    assert sessions.load_session(session_copy, "fox").turn_ids == (1, 2, 3)


def test_failed_commit_leaves_session_byte_identical(engine, session_copy, monkeypatch):
    folder = os.path.join(session_copy, "fox")
    before = folder_state(folder)

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sessions, "write_atomic", disk_full)
    with pytest.raises(OSError, match="No space"):
        chat.chat_turn(engine, session_copy, "fox", "never saved", seed=1, **FAST)
    assert folder_state(folder) == before


def _corrupt(path, how):
    with open(path, "rb") as f:
        data = json.loads(f.read())
    if how == "syntax":
        payload = b"{ not json"
    elif how == "format":
        payload = json.dumps(dict(data, format="something-else")).encode()
    elif how == "escape":
        data["turns"][0]["image"] = "../../etc/passwd"
        payload = json.dumps(data).encode()
    elif how == "missing-key":
        del data["turns"][1]["reply"]
        payload = json.dumps(data).encode()
    with open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("how", ["syntax", "format", "escape", "missing-key"])
def test_corrupt_session_file_gives_clear_error_and_is_never_overwritten(engine, session_copy, how):
    path = os.path.join(session_copy, "fox", sessions.SESSION_FILE)
    _corrupt(path, how)
    before = folder_state(os.path.join(session_copy, "fox"))
    with pytest.raises(sessions.CorruptSessionError, match="is corrupt") as info:
        chat.chat_turn(engine, session_copy, "fox", "hello", seed=1, **FAST)
    assert path in str(info.value) and "left untouched" in str(info.value)
    for change in (sessions.undo_turn, sessions.reset_session):
        with pytest.raises(sessions.CorruptSessionError):
            change(session_copy, "fox")
    assert folder_state(os.path.join(session_copy, "fox")) == before


def test_tampered_features_or_missing_image_are_refused(engine, session_copy):
    folder = os.path.join(session_copy, "fox")
    with open(os.path.join(folder, "turns", "000002", "features.json"), "ab") as f:
        f.write(b" ")
    before = folder_state(folder)
    with pytest.raises(sessions.CorruptSessionError, match="checksum"):
        chat.chat_turn(engine, session_copy, "fox", "hello", seed=1, **FAST)
    os.remove(os.path.join(folder, "turns", "000001", "image.png"))
    with pytest.raises(sessions.CorruptSessionError, match="missing"):
        sessions.load_session(session_copy, "fox")
    before.pop(os.path.join("turns", "000001", "image.png"))
    assert folder_state(folder) == before


# Undo, reset, fork, pinned state, busy ------------------------------------------------------------

def test_undo_reset_fork(engine, session_copy):
    fork = sessions.fork_session(session_copy, "fox", "fox-b", 2)
    assert fork.turn_ids == (1, 2) and fork.next_id == 4
    assert sessions.load_session(session_copy, "fox").turn_ids == (1, 2, 3)
    a = sessions.load_session(session_copy, "fox")
    assert torch.equal(fork.features(fork.turns[1]), a.features(a.turns[1]))
    cont = chat.chat_turn(engine, session_copy, "fox-b", "a different third turn", seed=3, **FAST)
    assert cont.session.turn_ids == (1, 2, 4)
    with pytest.raises(sessions.SessionError, match="already exists"):
        sessions.fork_session(session_copy, "fox", "fox-b", 1)
    with pytest.raises(sessions.SessionError, match=r"0\.\.3"):
        sessions.fork_session(session_copy, "fox", "fox-c", 4)
    with pytest.raises(sessions.SessionError, match="no chat session named 'nope'"):
        sessions.fork_session(session_copy, "nope", "fox-d", 0)

    undone = sessions.undo_turn(session_copy, "fox")
    assert undone.turn_ids == (1, 2) and not os.path.exists(os.path.join(session_copy, "fox", "turns", "000003"))
    again = chat.chat_turn(engine, session_copy, "fox", "redo turn three", seed=7, **FAST)
    assert again.session.turn_ids == (1, 2, 4)  # ids are never reused
    cleared = sessions.reset_session(session_copy, "fox")
    assert cleared.turns == () and os.listdir(os.path.join(session_copy, "fox", "turns")) == []
    with pytest.raises(sessions.SessionError, match="no turn to undo"):
        sessions.undo_turn(session_copy, "fox")
    with pytest.raises(sessions.SessionError, match="no chat session named 'ghost'"):
        sessions.undo_turn(session_copy, "ghost")
    assert not os.path.exists(os.path.join(session_copy, "ghost"))
    assert sessions.list_sessions(session_copy) == ["fox", "fox-b"]


def test_pinned_state_and_busy_session(engine, session_copy, session_held):
    before = folder_state(os.path.join(session_copy, "fox"))
    with pytest.raises(sessions.SessionError, match="changed since"):
        chat.chat_turn(engine, session_copy, "fox", "hi", seed=1, expect_turns=(1, 2), **FAST)
    with session_held(session_copy, "fox"):
        with pytest.raises(sessions.SessionError, match="busy"):
            sessions.undo_turn(session_copy, "fox", blocking=False)
    assert folder_state(os.path.join(session_copy, "fox")) == before
    ok = chat.chat_turn(engine, session_copy, "fox", "hi", seed=1, expect_turns=(1, 2, 3), **FAST)
    assert ok.session.turn_ids == (1, 2, 3, 4)


def test_bad_turn_inputs_name_the_input_and_change_nothing(engine, session_copy, tmp_path):
    folder = os.path.join(session_copy, "fox")
    before = folder_state(folder)
    mask = _square_mask()
    cases = [
        (dict(message="  "), "message must be a non-empty string"),
        (dict(images=torch.rand(1, 8, 8)), "images must be a float tensor"),
        (dict(mask=mask, reference=None), "a mask or strength < 1 needs a reference"),
        (dict(strength=0.5, reference=None), "a mask or strength < 1 needs a reference"),
        (dict(mask=torch.rand(2, 64, 64), reference="previous"), "mask must be a float tensor"),
        (dict(reference="last"), "reference must be None"),
        (dict(reference=torch.rand(64, 64, 3)), r"reference image must be \(1, H, W, 3\)"),
        (dict(reference=torch.rand(1, 32, 32, 3)), "reference image is 32x32 but this turn is 64x64"),
        (dict(reference="previous", width=128, height=128), "reference image is 64x64 but this turn is 128x128"),
        (dict(reference="previous", mask=torch.ones(32, 32)), "mask is 32x32"),
        (dict(reference="previous", mask=torch.zeros(64, 64)), "mask is empty"),
        (dict(feather=-2), r"feather must be an integer in 0\.\.256"),
        (dict(history_features="pixels"), "history_features must be one of"),
        (dict(seed=-1), "seed must be an integer"),
        (dict(strength=1.5), "strength must be in 0..1"),
        (dict(steps=0), "steps must be an integer"),
        (dict(width=65), "width must be a positive multiple of 8"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(prefix_cache="yes"), "prefix_cache must be"),
    ]
    for kwargs, match in cases:
        args = dict(FAST, message="hello", seed=1)
        args.update(kwargs)
        message = args.pop("message")
        with pytest.raises(ValueError, match=match):
            chat.chat_turn(engine, session_copy, "fox", message, **args)
    assert folder_state(folder) == before
    empty = str(tmp_path / "empty")
    with pytest.raises(sessions.SessionError, match="needs an earlier turn"):
        chat.chat_turn(engine, empty, "new", "hi", reference="previous", **FAST)
    with pytest.raises(sessions.SessionError, match="no previous image yet"):
        chat.chat_turn(engine, empty, "new", "hi", strength=0.5, reference="auto", **FAST)
    assert not os.path.exists(os.path.join(empty, "new", sessions.SESSION_FILE))


# Two processes, one session ------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    from wegen import chat
    from wegen.engine import WeGenEngine
    engine = WeGenEngine.load({ckpt!r}, dtype="fp32")
    tag, sessions, go = sys.argv[1], sys.argv[2], sys.argv[3]
    open(os.path.join(sessions, "ready-" + tag), "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    stamps = []
    def cb(info):
        stamps.append(time.time())
        if len(stamps) == 1:
            time.sleep(0.2)  # widen the window: without the lock the two turns would overlap here
    res = chat.chat_turn(engine, sessions, "shared", "turn from " + tag, seed=int(tag), steps=4, width=64,
                         height=64, callback=cb)
    print(json.dumps({{"first": stamps[0], "last": stamps[-1], "id": res.record.id}}))
""")


@pytest.mark.integration
def test_two_processes_serialise_turns_on_one_session(tiny_ckpt, tmp_path):
    root = str(tmp_path / "root")
    os.makedirs(root)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=ROOT, ckpt=tiny_ckpt))
    go = str(tmp_path / "go")
    procs = [subprocess.Popen([sys.executable, str(script), tag, root, go], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in ("1", "2")]
    try:
        import time
        deadline = time.time() + 120
        while not all(os.path.exists(os.path.join(root, f"ready-{t}")) for t in ("1", "2")):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        open(go, "w").close()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    runs = sorted((json.loads(o.strip().splitlines()[-1]) for o, _ in outs), key=lambda r: r["first"])
    assert runs[0]["last"] < runs[1]["first"]  # the critical sections never overlap
    session = sessions.load_session(root, "shared")
    assert session.turn_ids == (1, 2) and {r["id"] for r in runs} == {1, 2}
    first, second = session.turns
    assert second.stats["prompt_tokens"] > first.stats["prompt_tokens"] + 64  # the second turn saw the first
    for t in session.turns:
        assert session.features(t).shape == (1, 64, 112)


# The command line and the transcript ---------------------------------------------------------------

def test_cli_chat_resumes_across_invocations(capsys, tiny_ckpt, tmp_path):
    root = str(tmp_path / "s")
    outs = []
    for i, message in enumerate(["a lighthouse at dusk", "add a boat"]):
        out = tmp_path / f"turn{i}.png"
        code = main(["chat", "--checkpoint", tiny_ckpt, "--session", "harbour", "--sessions-dir", root,
                     "--steps", "2", "--size", "64", message, "--out", str(out),
                     "--transcript", str(tmp_path / "t.html")])
        stdout, stderr = capsys.readouterr()
        assert code == 0, stderr
        outs.append(json.loads(stdout))
        assert out.is_file()
    assert [o["turn"] for o in outs] == [1, 2]
    session = sessions.load_session(root, "harbour")
    assert [t.user for t in session.turns] == ["a lighthouse at dusk", "add a boat"]
    page = (tmp_path / "t.html").read_text()
    assert page.count("<section>") == 2 and "add a boat" in page
    code = main(["chat", "--checkpoint", tiny_ckpt, "--session", "harbour", "--sessions-dir", root, "--steps",
                 "2", "--size", "64", "--strength", "0.5", "--reference", "previous", "--mask",
                 str(tmp_path / "turn0.png"), "calm sea", "--out", str(tmp_path / "t3.png")])
    assert code == 0 and json.loads(capsys.readouterr()[0])["turn"] == 3
    assert sessions.load_session(root, "harbour").turns[-1].settings["reference"] == "previous"


@pytest.mark.parametrize("argv,match", [
    (["--session", "../up"], "session name must be"),
    (["--session", "ok", "--strength", "2"], "strength must be in 0..1"),
    (["--session", "ok", "--reference", "previous"], "needs an earlier turn"),
    (["--session", "ok", "--transcript", "/proc/no/such/t.html"], "cannot be written"),
])
def test_cli_chat_bad_input_exits_2(capsys, tiny_ckpt, tmp_path, argv, match):
    code = main(["chat", "--checkpoint", tiny_ckpt, "--sessions-dir", str(tmp_path / "s"), "--steps", "2",
                 "--size", "64", "hello", "--out", str(tmp_path / "o.png"), *argv])
    err = capsys.readouterr()[1]
    assert code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "s" / "ok" / sessions.SESSION_FILE)  # no turn was saved


def test_cli_chat_corrupt_session_exits_2_and_keeps_file(capsys, tiny_ckpt, tmp_path):
    folder = tmp_path / "s" / "bad"
    folder.mkdir(parents=True)
    (folder / sessions.SESSION_FILE).write_bytes(b"\x00garbage")
    code = main(["chat", "--checkpoint", tiny_ckpt, "--sessions-dir", str(tmp_path / "s"), "--session", "bad",
                 "--steps", "2", "--size", "64", "hello", "--out", str(tmp_path / "o.png")])
    assert code == 2 and "is corrupt" in capsys.readouterr()[1]
    assert (folder / sessions.SESSION_FILE).read_bytes() == b"\x00garbage"


def test_transcript_page_and_demo_items(three_turns, tmp_path):
    import shutil

    from ComfyUI_WeGen.nodes import demo  # the demo's workflow side (the pack, loaded as ComfyUI loads it)

    out = tmp_path / "demo"
    shutil.copytree(os.path.join(three_turns[0], "fox"), out / "wegen" / "sessions" / "fox")
    prompt = {"2": {"class_type": "WeGenChatMemory", "inputs": {"session_name": "fox", "action": "reset"}}}
    items = demo._chat_items(prompt, str(out))
    assert items[0] == {"link": "chat.html", "caption": "Transcript of the chat session 'fox' (3 turns)"}
    files = [it["file"] for it in items[1:]]
    assert files == [f"wegen/sessions/fox/turns/00000{i}/image.png" for i in (1, 2, 3)]
    page = (out / "chat.html").read_text(encoding="utf-8")
    assert page.count("<section>") == 3 and all(f'src="{f}"' in page for f in files)
    assert all(html.escape(m) in page for m in MSGS)
