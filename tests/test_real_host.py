"""The pack inside a real ComfyUI (skipped unless COMFYUI_PATH points at a ComfyUI checkout).

Starts `main.py --cpu` on a free loopback port with the pack loaded through an extra_model_paths.yaml
(custom_nodes: a temp folder holding a `ComfyUI-WeGen` link to this repo; wegen: a folder holding the
tiny checkpoint), checks /object_info, posts every tests/workflows/*.api.json to /prompt and waits for
success in /history, checks the UI workflows' widgets and links against the real node definitions,
loads them into the real frontend (headless chromium via selenium, when installed) and compares its
"Export (API)" with the twins, interrupts a long decode, and unloads models between runs.
COMFYUI_PYTHON picks ComfyUI's interpreter (default: this one).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from nodes import NODE_CLASS_MAPPINGS

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-WeGen"
API_WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "tests", "workflows", "*.api.json")))
UI_WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600
FRONTEND_WIDGETS = {"PreviewAny": 3}  # widgets the frontend adds on its own (preview, preview, previewMode)
VIRTUAL_NODES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log_path: str, output_dir: str):
        self.url, self.process, self.log_path, self.output_dir = url, process, log_path, output_dir

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:2000]}") from e
        return json.loads(data) if data.strip() else None

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_history(self, prompt_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.log()[-4000:]}"
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict) -> dict:
        answer = self.post("/prompt", {"prompt": prompt, "client_id": "wegen-tests"})
        assert not answer.get("node_errors"), answer
        return self.wait_history(answer["prompt_id"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt):
    base = tmp_path_factory.mktemp("comfy")
    for sub in ("custom_nodes", "models/wegen", "out", "temp", "input", "user"):
        (base / sub).mkdir(parents=True)
    os.symlink(ROOT, base / "custom_nodes" / PACK_NAME)
    os.symlink(tiny_ckpt, base / "models" / "wegen" / "tiny")
    (base / "extra_model_paths.yaml").write_text(
        f"wegen_tests:\n    custom_nodes: {base / 'custom_nodes'}\n    wegen: {base / 'models' / 'wegen'}\n")
    port = _free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--output-directory", str(base / "out"), "--temp-directory", str(base / "temp"),
               "--input-directory", str(base / "input"), "--user-directory", str(base / "user"),
               "--database-url", "sqlite:///:memory:", "--preview-method", "latent2rgb",
               "--extra-model-paths-config", str(base / "extra_model_paths.yaml"),
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME]
    log_path = str(base / "comfyui.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", process, log_path, str(base / "out"))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"ComfyUI exited with {process.returncode}:\n{srv.log()[-4000:]}"
            assert time.monotonic() < deadline, f"ComfyUI did not answer in {START_TIMEOUT_S} s:\n{srv.log()[-4000:]}"
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_pack_loads_and_registers_every_node(server):
    log = server.log()
    assert "IMPORT FAILED" not in log and PACK_NAME in log, log[-4000:]
    info = server.get("/object_info")
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        entry = info[node_id]
        assert entry["category"] == cls.CATEGORY and entry["display_name"] == cls.TITLE
        assert entry["output"] == list(cls.RETURN_TYPES) and entry["description"] == cls.DESCRIPTION
        ours = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            assert list(entry["input"].get(section, {})) == list(ours.get(section, {})), (node_id, section)
    assert "tiny" in info["WeGenLoader"]["input"]["required"]["checkpoint"][0]


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=os.path.basename)
def test_api_workflow_succeeds(server, path):
    with open(path, encoding="utf-8") as f:
        prompt = json.load(f)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"], entry["status"]
    saves = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    for node_id in saves:
        for image in entry["outputs"][node_id]["images"]:
            assert os.path.isfile(os.path.join(server.output_dir, image["subfolder"], image["filename"]))
    assert "loaded completely" in server.log()  # WeGen's modules went through load_models_gpu


def _widget_slots(spec: dict) -> int:
    """widgets_values length the frontend saves for a node definition from /object_info."""
    slots = 0
    for section in ("required", "optional"):
        names = spec.get("input_order", {}).get(section) or list(spec["input"].get(section, {}))
        for name in names:
            kind, *rest = spec["input"][section][name]
            options = rest[0] if rest else {}
            kind = "COMBO" if isinstance(kind, list) else kind
            if kind not in WIDGET_TYPES or options.get("forceInput"):
                continue
            slots += 1
            if options.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed")):
                slots += 1
    return slots


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=os.path.basename)
def test_ui_workflow_matches_the_real_node_definitions(server, path):
    info = server.get("/object_info")
    with open(path, encoding="utf-8") as f:
        wf = json.load(f)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        spec = info[node["type"]]
        expected = _widget_slots(spec) + FRONTEND_WIDGETS.get(node["type"], 0)
        assert len(node["widgets_values"]) == expected, (node["id"], node["type"], node["widgets_values"])
        inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for slot in node["inputs"]:
            assert slot["name"] in inputs, (node["type"], slot["name"])
    for _, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert info[nodes[src]["type"]]["output"][src_slot] == kind
        declared = info[nodes[dst]["type"]]["input"]
        name = nodes[dst]["inputs"][dst_slot]["name"]
        wanted = {**declared.get("required", {}), **declared.get("optional", {})}[name][0]
        assert wanted in (kind, "*"), (nodes[dst]["type"], name, wanted, kind)


def test_interrupt_stops_a_long_decode(server):
    with open(os.path.join(ROOT, "tests", "workflows", "wegen_text_to_image.api.json"), encoding="utf-8") as f:
        prompt = json.load(f)
    server.run(prompt)  # loader and encode outputs are cached from here on: only the decode reruns
    decode = next(k for k, v in prompt.items() if v["class_type"] == "WeGenConsistencyDecode")
    prompt[decode]["inputs"]["steps"] = 1000
    answer = server.post("/prompt", {"prompt": prompt, "client_id": "wegen-tests"})
    deadline = time.monotonic() + 120
    while not server.get("/queue")["queue_running"]:
        assert time.monotonic() < deadline, "the long decode never started"
        time.sleep(0.2)
    time.sleep(3)
    server.post("/interrupt", {})
    entry = server.wait_history(answer["prompt_id"], timeout=120)
    messages = dict(entry["status"]["messages"])
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in messages, entry["status"]
    assert messages["execution_interrupted"]["node_type"] == "WeGenConsistencyDecode"


def test_unload_models_then_run_again(server):
    server.post("/free", {"unload_models": True, "free_memory": True})
    with open(os.path.join(ROOT, "tests", "workflows", "wegen_reconstruction.api.json"), encoding="utf-8") as f:
        prompt = json.load(f)
    prompt["3"]["inputs"]["seed"] = 7  # a new seed: the decode and everything after it run again
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    """Headless chromium on the server's page (skips without chromium, chromedriver and selenium)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (requirements-dev.txt)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(120)
    try:
        driver.get(server.url + "/")
        deadline = time.monotonic() + 180
        ready = "return !!(window.app && window.app.graph && LiteGraph.registered_node_types['WeGenLoader'])"
        while not driver.execute_script(ready):
            assert time.monotonic() < deadline, "the ComfyUI frontend never registered the WeGen nodes"
            time.sleep(0.5)
        yield driver
    finally:
        driver.quit()


@pytest.mark.browser
@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=os.path.basename)
def test_frontend_loads_ui_workflow_and_exports_the_twin(browser, path):
    """Drag-and-drop equivalent: app.loadGraphData, then the prompt the frontend would queue (Export (API))."""
    with open(path, encoding="utf-8") as f:
        wf = json.load(f)
    name = os.path.basename(path)[:-len(".json")]
    result = browser.execute_script("""
        const [wf, name] = arguments;
        return (async () => {
            await app.loadGraphData(wf, true, true, name);
            const missing = app.graph._nodes.map(n => n.type).filter(t => !LiteGraph.registered_node_types[t]);
            const prompt = await app.graphToPrompt();
            return JSON.stringify({count: app.graph._nodes.length, missing, output: prompt.output});
        })();""", wf, name)
    result = json.loads(result)
    assert result["missing"] == [] and result["count"] == len(wf["nodes"])
    with open(os.path.join(ROOT, "tests", "workflows", f"{name}.api.json"), encoding="utf-8") as f:
        twin = json.load(f)
    exported = {k: (v["class_type"], {i: x for i, x in v["inputs"].items()
                                      if not (v["class_type"] == "PreviewAny" and i in ("preview", "previewMode"))})
                for k, v in result["output"].items()}
    assert exported == {k: (v["class_type"], v["inputs"]) for k, v in twin.items()}
