"""WeGen Chat Memory / Chat Turn under the stand-in ComfyUI host (tests/host_stubs.py): return values,
pinned chat state, progress + memory management per stage, interrupts that save nothing, and the
/wegen/chat/* route functions the chat panel calls (only files of that session are served)."""
from __future__ import annotations

import math
import os

import pytest
import torch
from ComfyUI_WeGen.nodes import NODE_CLASS_MAPPINGS, host
from ComfyUI_WeGen.nodes import chat as chat_nodes
from ComfyUI_WeGen.nodes.loader import WeGenLoader
from ComfyUI_WeGen.wegen import decoder, sessions
from faults import folder_state

from host_stubs import InterruptProcessingException

SMALL = dict(seed=42, steps=2, cfg=2.0, width=64, height=64)


@pytest.fixture(scope="session")
def engine(pack_engine):
    """The nodes' copy of the engine (ComfyUI_WeGen.wegen): the one their loader caches."""
    return pack_engine



@pytest.fixture
def model(comfy_host):
    return WeGenLoader().load("tiny", "fp32", "gpu")[0]


@pytest.fixture
def root(comfy_host):
    return chat_nodes.sessions_root()


def turn(model, ref, message, **kw):
    args = dict(SMALL)
    args.update(kw)
    return chat_nodes.WeGenChatTurn().turn(model, ref, message, **args)


def test_nodes_are_registered_and_sessions_live_in_the_output_folder(comfy_host, root):
    assert NODE_CLASS_MAPPINGS["WeGenChatMemory"] is chat_nodes.WeGenChatMemory
    assert NODE_CLASS_MAPPINGS["WeGenChatTurn"] is chat_nodes.WeGenChatTurn
    output = comfy_host.modules["folder_paths"].get_output_directory()
    assert root == os.path.abspath(os.path.join(output, "wegen", "sessions"))
    for cls in (chat_nodes.WeGenChatMemory, chat_nodes.WeGenChatTurn):
        assert "extension" in cls.DESCRIPTION.lower() and cls.CATEGORY == "WeGen/chat"
    spec = chat_nodes.WeGenChatTurn.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "chat", "message", "seed", "steps", "cfg", "width", "height",
                                      "strength", "feather", "history_features"]  # widget order is permanent
    assert spec["required"]["seed"][1]["control_after_generate"] is True
    assert list(spec["optional"]) == ["images", "mask"]
    for name in ("strength", "feather", "history_features"):
        assert "extension" in spec["required"][name][1]["tooltip"].lower()


def test_sessions_root_without_comfyui_follows_the_headless_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert chat_nodes.sessions_root() == str(tmp_path / "output" / "wegen" / "sessions")
    with host.output_to(str(tmp_path / "run")):
        assert chat_nodes.sessions_root() == str(tmp_path / "run" / "wegen" / "sessions")
    assert host.output_directory() == str(tmp_path / "output")


def test_three_turns_through_the_nodes(comfy_host, model, root):
    (ref,) = chat_nodes.WeGenChatMemory().open("studio", "continue")
    assert ref.turn_ids == () and ref.root == root
    out1 = turn(model, ref, "a lighthouse at dusk")
    image1, reply1, ref1 = out1["result"]
    assert image1.shape == (1, 64, 64, 3) and image1.dtype == torch.float32 and isinstance(reply1, str)
    assert out1["ui"]["wegen_chat"] == [{"session": "studio", "revision": 1, "turns": 1}]
    assert len(out1["result"]) == len(chat_nodes.WeGenChatTurn.RETURN_TYPES)
    out2 = turn(model, ref1, "add a boat", seed=7, strength=0.6)
    mask = torch.zeros(1, 64, 64)
    mask[:, 40:, 16:48] = 1.0
    out3 = turn(model, out2["result"][2], "calmer sea", seed=8, strength=0.7, feather=4, mask=mask)
    image3, _, ref3 = out3["result"]
    assert ref3.turn_ids == (1, 2, 3)
    session = sessions.load_session(root, "studio")
    assert [t.settings["reference"] for t in session.turns] == ["none", "previous", "previous"]
    outside = decoder.feather_weight(mask, 4)[0, 0] == 0
    assert torch.equal(image3[0][outside], session.image(session.turns[1])[0][outside])
    # each stage went through ComfyUI's memory manager and progress bar
    loaded = [[p.model.inner for p in patchers] for patchers, _ in comfy_host.loads]
    engine = host.load_engine(model)
    assert [engine.mllm] in loaded and [engine.unet, engine.vae] in loaded
    assert comfy_host.bars and comfy_host.updates[-1][0] == comfy_host.updates[-1][1]


def test_memory_actions_and_is_changed(comfy_host, model, root):
    memory = chat_nodes.WeGenChatMemory()
    (ref,) = memory.open("acts", "continue")
    before = chat_nodes.WeGenChatMemory.IS_CHANGED("acts", "continue")
    ref = turn(model, ref, "one")["result"][2]
    ref = turn(model, ref, "two")["result"][2]
    after = chat_nodes.WeGenChatMemory.IS_CHANGED("acts", "continue")
    assert before != after  # a changed session re-runs the Memory node (and what follows it)
    undo = memory.open("acts", "undo last turn")[0]
    assert undo.turn_ids == (1,) and undo.undone == 2 and undo.expect_turns() == (1, 2)
    reset = memory.open("acts", "reset")[0]
    assert reset.turn_ids == () and reset.reset and reset.expect_turns() is None
    assert sessions.load_session(root, "acts").turn_ids == (1, 2)  # the next Chat Turn applies them, with its turn
    assert math.isnan(chat_nodes.WeGenChatMemory.IS_CHANGED("../x", "continue"))
    with pytest.raises(ValueError, match="session name"):
        memory.open("../x", "continue")
    with pytest.raises(ValueError, match="action must be one of"):
        memory.open("acts", "delete")
    with pytest.raises(ValueError, match="no turn to undo"):
        memory.open("acts-empty", "undo last turn")
    assert not os.path.exists(os.path.join(root, "acts-empty"))


def test_memory_undo_commits_with_the_next_turn(comfy_host, model, root):
    memory = chat_nodes.WeGenChatMemory()
    ref = turn(model, memory.open("redo", "continue")[0], "one")["result"][2]
    turn(model, ref, "two")
    before = folder_state(os.path.join(root, "redo"))
    undo = memory.open("redo", "undo last turn")[0]
    assert folder_state(os.path.join(root, "redo")) == before  # nothing changes until a Chat Turn succeeds
    comfy_host.interrupt_at_update = len(comfy_host.updates) + 66  # 65 token steps, then denoise step 1
    with pytest.raises(InterruptProcessingException):
        turn(model, undo, "two, again", steps=4)
    assert folder_state(os.path.join(root, "redo")) == before  # the failed turn kept the undone one
    comfy_host.interrupt_at_update = None
    with pytest.raises(ValueError, match="mask is 32x32 but this turn is 64x64"):  # fails under the lock
        turn(model, undo, "two, again", mask=torch.ones(1, 32, 32))
    assert folder_state(os.path.join(root, "redo")) == before
    out = turn(model, undo, "two, again")
    session = sessions.load_session(root, "redo")
    assert out["result"][2].turn_ids == session.turn_ids == (1, 3) and out["result"][2].undone is None
    assert [t.user for t in session.turns] == ["one", "two, again"]
    assert sorted(os.listdir(os.path.join(root, "redo", "turns"))) == ["000001", "000003"]
    with pytest.raises(sessions.SessionError, match="changed since"):  # the same undo cannot drop a second turn
        turn(model, undo, "once more")
    assert sessions.load_session(root, "redo").turn_ids == (1, 3)


def test_session_file_that_is_a_folder_is_a_clear_error(comfy_host, root):
    path = os.path.join(root, "dir", sessions.SESSION_FILE)
    os.makedirs(path)
    for action in chat_nodes.ACTIONS:
        with pytest.raises(sessions.SessionError, match="is a folder; it must be a file") as info:
            chat_nodes.WeGenChatMemory().open("dir", action)
        assert path in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(sessions.SessionError, match="is a folder; it must be a file"):
        chat_nodes.api_session("dir")
    assert os.path.isdir(path)


def test_memory_reset_commits_with_the_next_turn(comfy_host, model, root):
    memory = chat_nodes.WeGenChatMemory()
    ref = turn(model, memory.open("again", "continue")[0], "one")["result"][2]
    turn(model, ref, "two")
    before = folder_state(os.path.join(root, "again"))
    comfy_host.interrupt_at_update = len(comfy_host.updates) + 66  # 65 token steps, then denoise step 1
    with pytest.raises(InterruptProcessingException):
        turn(model, memory.open("again", "reset")[0], "a fresh start", steps=4)
    assert folder_state(os.path.join(root, "again")) == before  # the failed turn kept the old turns
    comfy_host.interrupt_at_update = None
    out = turn(model, memory.open("again", "reset")[0], "a fresh start")
    session = sessions.load_session(root, "again")
    assert out["result"][2].turn_ids == session.turn_ids == (3,) and not out["result"][2].reset
    assert [t.user for t in session.turns] == ["a fresh start"]


def test_interrupted_turn_saves_nothing(comfy_host, model, root):
    (ref,) = chat_nodes.WeGenChatMemory().open("stop", "continue")
    ref = turn(model, ref, "first")["result"][2]
    before = folder_state(os.path.join(root, "stop"))
    comfy_host.interrupt_at_update = len(comfy_host.updates) + 66  # 65 token steps, then denoise step 1
    with pytest.raises(InterruptProcessingException):
        turn(model, ref, "second", steps=4)
    assert folder_state(os.path.join(root, "stop")) == before


def test_stale_chat_state_and_bad_inputs_are_refused(comfy_host, model, root):
    (ref0,) = chat_nodes.WeGenChatMemory().open("stale", "continue")
    turn(model, ref0, "first")
    before = folder_state(os.path.join(root, "stale"))
    with pytest.raises(sessions.SessionError, match="changed since"):
        turn(model, ref0, "from an old state")
    cases = [(dict(chat="not a chat"), "chat must be a WEGEN_CHAT"),
             (dict(message=3), "message must be a string"),
             (dict(message="  "), "message must be a non-empty string"),
             (dict(seed=-1), "seed must be an integer"),
             (dict(images=torch.rand(1, 64, 64, 4)), "drop the alpha"),
             (dict(mask=torch.ones(2, 64, 64)), "one mask"),
             (dict(history_features="clip"), "history_features must be one of")]
    (ref,) = chat_nodes.WeGenChatMemory().open("stale", "continue")
    for kwargs, match in cases:
        args = dict(SMALL, chat=ref, message="hello")
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            chat_nodes.WeGenChatTurn().turn(model, **args)
    assert folder_state(os.path.join(root, "stale")) == before


# Routes --------------------------------------------------------------------------------------------------

def test_routes_register_once_under_wegen(comfy_host, monkeypatch):
    monkeypatch.setattr(host, "_ROUTES", set())
    paths = chat_nodes.register_routes()
    assert paths == ["/wegen/chat/session", "/wegen/chat/image", "/wegen/chat/undo", "/wegen/chat/new"]
    server = comfy_host.modules["server"].PromptServer.instance
    assert [(m, p) for m, p, _ in server.routes.routes] == [("GET", paths[0]), ("GET", paths[1]),
                                                            ("POST", paths[2]), ("POST", paths[3])]
    assert chat_nodes.register_routes() == []  # a second import registers nothing twice
    with pytest.raises(ValueError, match="start with /wegen/"):
        host.add_route("GET", "/chat/session", lambda request: None)


def test_route_functions_serve_only_that_sessions_images(comfy_host, model, root, session_held):
    (ref,) = chat_nodes.WeGenChatMemory().open("panel", "continue")
    ref = turn(model, ref, "a cat", images=torch.rand(1, 64, 64, 3))["result"][2]
    summary = chat_nodes.api_session("panel")
    assert summary["name"] == "panel" and [t["user"] for t in summary["turns"]] == ["a cat"]
    t = summary["turns"][0]
    assert os.path.isfile(chat_nodes.api_image("panel", t["image"]))
    assert os.path.isfile(chat_nodes.api_image("panel", t["user_images"][0]))
    for bad in ("session.json", "../panel/session.json", "turns/000001/features.json", "/etc/passwd",
                "turns/000001/../../../x.png", "turns/000002/image.png", ""):
        with pytest.raises(ValueError, match="is not an image of chat session"):
            chat_nodes.api_image("panel", bad)
    for bad_name in ("../panel", "", "a/b"):
        with pytest.raises(ValueError, match="session name"):
            chat_nodes.api_session(bad_name)
    assert chat_nodes.api_session("nothing-yet")["turns"] == []
    assert not os.path.exists(os.path.join(root, "nothing-yet"))
    assert chat_nodes.api_new("panel") == {"name": "panel-2"}
    os.makedirs(os.path.join(root, "panel-2"))
    assert chat_nodes.api_new("panel-2") == {"name": "panel-3"}
    with session_held(root, "panel"):  # a turn is running: the panel's undo is refused at once, never queued
        with pytest.raises(ValueError, match="busy"):
            chat_nodes.api_undo("panel")
    assert chat_nodes.api_undo("panel")["turns"] == []
    with pytest.raises(ValueError, match="no turn to undo"):
        chat_nodes.api_undo("panel")


def test_unloading_the_llm_frees_its_prefix_cache(comfy_host, model, engine, root):
    """ComfyUI's "Unload models" detaches each module's ModelPatcher; the host's ON_DETACH callback calls
    engine.release(name), which clears the engine's prompt-prefix cache with the LLM (and only with it)."""
    from transformers import DynamicCache

    ref = chat_nodes.WeGenChatMemory().open("unload")[0]
    turn(model, ref, "a red fox")  # the LLM and the decoder go through ModelPatchers
    assert len(engine.prefix_cache) >= 1
    kv = DynamicCache()
    kv.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)
    engine.prefix_cache.store([1, 2, 3, 4], {}, kv)
    host.release_device_state(engine, "unet")
    assert len(engine.prefix_cache) >= 2  # other modules leave the LLM's caches alone
    comfy_host.modules["comfy.model_management"].unload_all_models()  # the "Unload models" button
    assert len(engine.prefix_cache) == 0 and engine.prefix_cache.nbytes == 0
