"""Every example workflow through the real ComfyUI page, as a person uses it.

For each workflows/*.json: the file is dropped on the canvas (a real `drop` event carrying the file, the path
drag-and-drop takes), the page's own graph-to-prompt must equal the API twin in tests/workflows/, the workflow
is queued from the page and must run to success, and then the page must show what the run produced: the
images in every output node, the text in every PreviewAny (the rewrites, the understanding answer), the sweep
grid with each prompt under its image, and the chat panel with the session's turns. The example workflows must
also be listed by ComfyUI's template browser. On failure a screenshot is written to output/test-screenshots/.

Runs with a real ComfyUI (COMFYUI_PATH) and Debian's chromium: the fixtures of tests/comfyui_host.py.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import time
import urllib.parse

import pytest
from comfyui_host import PACK_NAME, ROOT

UI_WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
SCREENSHOTS = os.path.join(ROOT, "output", "test-screenshots")
SHOW_TIMEOUT_S = 60
pytestmark = [pytest.mark.integration, pytest.mark.browser]

DROP = """
const [text, filename, count, done] = arguments;
const file = new File([text], filename, {type: 'application/json'});
const transfer = new DataTransfer();
transfer.items.add(file);
document.querySelector('canvas#graph-canvas').dispatchEvent(
    new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
const started = Date.now();
const poll = () => {
  const nodes = window.app.graph._nodes;
  if (nodes.length === count && nodes.every((n) => LiteGraph.registered_node_types[n.type])) {
    done({count: nodes.length, missing: []});
  } else if (Date.now() - started > 30000) {
    done({count: nodes.length, missing: nodes.map((n) => n.type).filter((t) => !LiteGraph.registered_node_types[t])});
  } else {
    setTimeout(poll, 200);
  }
};
setTimeout(poll, 200);
"""

GRAPH_TO_PROMPT = """
const done = arguments[0];
window.app.graphToPrompt().then((p) => done(JSON.stringify(p.output)), (e) => done('error: ' + e));
"""

QUEUE = """
const done = arguments[0];
window.app.queuePrompt(0, 1).then(() => done('ok'), (e) => done('error: ' + e));
"""

# What the page shows for each node: images of output nodes, PreviewAny texts, the sweep grid, the chat panel.
SHOWN = """
return Object.fromEntries(window.app.graph._nodes.map((n) => [String(n.id), {
  type: n.type,
  images: (n.imgs || []).map((i) => ({src: i.src, width: i.naturalWidth})),
  previews: (n.widgets || []).filter((w) => w.name === 'preview').map((w) => String(w.value ?? '')),
  sweep: n.wegenSweep ? [...n.wegenSweep.grid.querySelectorAll('.wegen-sweep-cell')].map((c) => ({
      width: c.querySelector('img').naturalWidth, seed: c.querySelector('.wegen-sweep-seed').textContent,
      prompt: c.querySelector('.wegen-sweep-prompt').textContent})) : null,
  chatTurns: n.wegenChat ? n.wegenChat.list.querySelectorAll('.wegen-chat-turn').length : null,
}]));
"""

CENTER_ON = """
const node = window.app.graph.getNodeById(Number(arguments[0]));
window.app.canvas.centerOnNode(node);
window.app.canvas.setDirty(true, true);
"""


@contextlib.contextmanager
def screenshot_on_failure(driver, name: str):
    try:
        yield
    except BaseException:
        os.makedirs(SCREENSHOTS, exist_ok=True)
        path = os.path.join(SCREENSHOTS, f"{name}.png")
        driver.save_screenshot(path)
        print(f"screenshot of the page: {path}")
        raise


def _api_twin(name: str) -> dict:
    with open(os.path.join(ROOT, "tests", "workflows", f"{name}.api.json"), encoding="utf-8") as f:
        twin = json.load(f)
    return {k: (v["class_type"], v["inputs"]) for k, v in twin.items()}


def _without_frontend_widgets(output: dict) -> dict:
    """The prompt minus PreviewAny's display-only widgets, which the API twins leave out."""
    return {k: (v["class_type"], {i: x for i, x in v["inputs"].items()
                                  if not (v["class_type"] == "PreviewAny" and i in ("preview", "previewMode"))})
            for k, v in output.items()}


def _wait_new_history(server, before: set, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.get("/history")
        done = [h for k, h in history.items()
                if k not in before and h.get("status", {}).get("status_str") in ("success", "error")]
        if done:
            return done[0]
        assert server.process.poll() is None, f"ComfyUI exited:\n{server.log()[-4000:]}"
        time.sleep(0.5)
    raise AssertionError(f"the queued workflow did not finish in {timeout} s:\n{server.log()[-4000:]}")


def _expected_display(outputs: dict) -> dict:
    """node id -> what its ui output says the page should show."""
    wanted = {}
    for node_id, out in outputs.items():
        if "images" in out:
            wanted[node_id] = ("images", [i["filename"] for i in out["images"]])
        if "text" in out:
            wanted[node_id] = ("text", out["text"][0])
        if "wegen_sweep" in out:
            shown = out["wegen_sweep"][0]
            wanted[node_id] = ("sweep", [(f"seed {s}", p) for s, p in zip(shown["seeds"], shown["prompts"])])
    return wanted


def _shows(node: dict, kind: str, value) -> bool:
    if kind == "images":
        return (len(node["images"]) == len(value) and all(i["width"] > 0 for i in node["images"])
                and all(urllib.parse.quote(name) in i["src"] for name, i in zip(value, node["images"])))
    if kind == "text":
        return value in node["previews"]
    if kind == "sweep":
        cells = node["sweep"] or []
        return [(c["seed"], c["prompt"]) for c in cells] == value and all(c["width"] > 0 for c in cells)
    raise AssertionError(kind)


def test_template_browser_lists_the_example_workflows(server):
    names = sorted(os.path.basename(p)[:-len(".json")] for p in UI_WORKFLOWS)
    listed = server.get("/api/workflow_templates")
    assert sorted(listed.get(PACK_NAME, [])) == names, listed
    for name in names:
        with open(os.path.join(ROOT, "workflows", f"{name}.json"), encoding="utf-8") as f:
            assert server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json") == json.load(f)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=os.path.basename)
def test_workflow_dropped_on_the_page_runs_and_shows_its_results(server, browser, path):
    name = os.path.basename(path)[:-len(".json")]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    workflow = json.loads(text)
    with screenshot_on_failure(browser, name):
        # 1) drag and drop
        loaded = browser.execute_async_script(DROP, text, f"{name}.json", len(workflow["nodes"]))
        assert loaded == {"count": len(workflow["nodes"]), "missing": []}, loaded

        # 2) the page's own conversion equals the API twin
        output = browser.execute_async_script(GRAPH_TO_PROMPT)
        assert not output.startswith("error"), output
        assert _without_frontend_widgets(json.loads(output)) == _api_twin(name)

        # 3) queued from the page, runs to success
        before = set(server.get("/history"))
        assert browser.execute_async_script(QUEUE) == "ok"
        entry = _wait_new_history(server, before)
        assert entry["status"]["status_str"] == "success", (entry["status"], server.log()[-4000:])

        # 4) the page shows every output
        wanted = _expected_display(entry["outputs"])
        assert wanted, f"{name} produced no output the page could show"
        deadline = time.monotonic() + SHOW_TIMEOUT_S
        while True:
            shown = browser.execute_script(SHOWN)
            missing = {k: v for k, v in wanted.items() if k not in shown or not _shows(shown[k], *v)}
            chats = [n for n in shown.values() if n["chatTurns"] is not None]
            turns_ok = all(n["chatTurns"] == len([x for x in workflow["nodes"] if x["type"] == "WeGenChatTurn"])
                           for n in chats)
            if not missing and turns_ok:
                break
            unseen = [k for k, (kind, _) in missing.items() if kind == "images"]
            if unseen:  # LiteGraph loads a node's images when it draws it: bring the node into view, as a person would
                browser.execute_script(CENTER_ON, unseen[0])
            assert time.monotonic() < deadline, (
                f"the page does not show {missing} (chat panels: {[n['chatTurns'] for n in chats]}); shown: "
                f"{ {k: shown.get(k) for k in missing} }")
            time.sleep(0.5)
        kinds = {kind for kind, _ in wanted.values()}
        expected_kinds = {"images"} | ({"sweep", "text"} if name == "psr_diversity_sweep" else set())
        assert expected_kinds <= kinds, (name, kinds)
