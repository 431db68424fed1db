"""The chat panel in a real browser: Debian's chromium (headless, driven by selenium) opens the real ComfyUI
page with the pack loaded, loads workflows/chat_iterative_refine.json, queues it, and checks that the panel
on the Chat Turn nodes shows the three turns (then its undo and new-session buttons, and that the pack's
routes serve only that session's images).

The server and browser fixtures are tests/comfyui_host.py's (ComfyUI on a free loopback port, the pack through
extra_model_paths.yaml; they skip without COMFYUI_PATH, chromium, chromedriver or selenium).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SESSION = "chat_iterative_refine"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.integration, pytest.mark.browser]


def http(url: str):
    """(status, body bytes) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# The test -------------------------------------------------------------------------------------------------

PANEL_STATE = """
const turnsOf = (n) => n.wegenChat ? n.wegenChat.list.querySelectorAll('.wegen-chat-turn').length : -1;
const nodes = (window.app?.graph?._nodes ?? []).filter((n) => n.type === 'WeGenChatTurn');
return {nodes: nodes.length, turns: nodes.map(turnsOf), titles: nodes.map((n) => n.wegenChat?.title.textContent),
        inDocument: document.querySelectorAll('.wegen-chat-panel .wegen-chat-turn').length,
        memory: (window.app?.graph?._nodes ?? []).filter((n) => n.type === 'WeGenChatMemory')
                  .map((n) => n.widgets.find((w) => w.name === 'session_name').value)};
"""


def wait_for(driver, condition, timeout: float, what: str, server=None, before=()):
    """Poll the panels until condition(state); fail early when the queued workflow (a history entry not in
    `before`: the server is shared with other tests) failed."""
    deadline = time.time() + timeout
    state = None
    while time.time() < deadline:
        state = driver.execute_script(PANEL_STATE)
        if condition(state):
            return state
        if server is not None:
            failed = [h["status"] for k, h in server.get("/history").items()
                      if k not in before and h.get("status", {}).get("status_str") == "error"]
            assert not failed, f"the workflow failed: {failed}\n{server.log()[-4000:]}"
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}; panel state {state}\n{server.log()[-4000:] if server else ''}")


def test_chat_panel_shows_the_three_turns_of_the_workflow(server, browser):
    url = server.url
    assert "WeGenChatTurn" in server.get("/object_info/WeGenChatTurn")
    with open(os.path.join(ROOT, "workflows", "chat_iterative_refine.json"), encoding="utf-8") as f:
        workflow = json.load(f)
    loaded = browser.execute_async_script(
        "const [wf, done] = arguments; window.app.loadGraphData(wf).then(() => done('ok'), (e) => done(String(e)));",
        workflow)
    assert loaded == "ok"
    state = browser.execute_script(PANEL_STATE)
    assert state["nodes"] == 3 and -1 not in state["turns"]  # a panel on every Chat Turn node
    before = set(server.get("/history"))
    queued = browser.execute_async_script(
        "const done = arguments[0]; window.app.queuePrompt(0, 1).then(() => done('ok'), (e) => done(String(e)));")
    assert queued == "ok"

    # 1) after the run every Chat Turn's panel shows the session's three turns
    state = wait_for(browser, lambda s: s["turns"] == [3, 3, 3], 420, "three turns in every panel", server, before)
    assert all(f"{SESSION} (3 turns)" in t for t in state["titles"]) and state["inDocument"] >= 3
    widths = browser.execute_async_script("""
        const done = arguments[0];
        const imgs = [...window.app.graph._nodes.find((n) => n.type === 'WeGenChatTurn').wegenChat.list
                       .querySelectorAll('img')];
        Promise.all(imgs.map((i) => i.decode().then(() => i.naturalWidth, () => 0))).then(done);""")
    assert widths == [64, 64, 64, 64]  # turn 1, turn 2, turn 3's mask and picture, served by the pack
    session_file = os.path.join(server.output_dir, "wegen", "sessions", SESSION, "session.json")
    with open(session_file, encoding="utf-8") as f:
        assert [t["user"] for t in json.load(f)["turns"]] == [
            "a small blue square at the center on a gray background", "make it yellow", "move it to the top right"]

    # 2) the routes serve only this session's images
    summary = server.get(f"/api/wegen/chat/session?name={SESSION}")
    status, body = http(f"{url}/api/wegen/chat/image?name={SESSION}&file={summary['turns'][0]['image']}")
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    for query in (f"name={SESSION}&file=session.json", f"name={SESSION}&file=../{SESSION}/session.json",
                  f"name={SESSION}&file=turns/000001/features.json", "name=..%2Fx&file=turns/000001/image.png"):
        assert http(f"{url}/api/wegen/chat/image?{query}")[0] == 404, query
    assert http(f"{url}/api/wegen/chat/session?name=..%2Fx")[0] == 400

    # 3) "undo" removes the last turn; "new session" points Chat Memory at a fresh name
    browser.execute_script("window.app.graph._nodes.find((n) => n.type === 'WeGenChatTurn')"
                           ".wegenChat.root.querySelector('.wegen-chat-undo').click()")
    wait_for(browser, lambda s: s["turns"] == [2, 2, 2], 30, "two turns after undo")
    with open(session_file, encoding="utf-8") as f:
        assert len(json.load(f)["turns"]) == 2
    browser.execute_script("window.app.graph._nodes.find((n) => n.type === 'WeGenChatTurn')"
                           ".wegenChat.root.querySelector('.wegen-chat-new').click()")
    wait_for(browser, lambda s: s["memory"] == [f"{SESSION}-2"] and s["turns"] == [0, 0, 0], 30,
             "a new, empty session")
    assert os.path.isfile(session_file)  # the old session is kept
