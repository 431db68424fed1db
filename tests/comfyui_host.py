"""pytest plugin (tests/conftest.py: pytest_plugins): a real ComfyUI and a real browser on its page.

`server`: ComfyUI's `main.py --cpu` (COMFYUI_PATH: a ComfyUI checkout; COMFYUI_PYTHON: its interpreter, default
this one) on a free loopback port, with this pack loaded through an extra_model_paths.yaml (custom_nodes: a temp
folder holding a `ComfyUI-WeGen` link to this repo; wegen: a folder holding the tiny checkpoint). One server for
the whole test session. `browser`: Debian's chromium, headless, driven by selenium, on the server's page.

Without COMFYUI_PATH (or chromium, chromedriver, selenium) the tests that use them skip. With
WEGEN_REQUIRE_COMFYUI=1 (.ci/run sets it) such a skip is a failure: CI always runs them.
"""
from __future__ import annotations

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

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REQUIRED = os.environ.get("WEGEN_REQUIRE_COMFYUI") == "1"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-WeGen"
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a real-host or browser test that skips has not run: report it as a failure."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped and {"server", "browser"} & set(getattr(item, "fixturenames", ())):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"WEGEN_REQUIRE_COMFYUI=1 but the test skipped: {reason}"


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


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_ckpt):
    """ComfyUI on a free loopback port with the pack loaded (skips without COMFYUI_PATH)."""
    if not COMFYUI_PATH:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run the real-host tests")
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


@pytest.fixture(scope="session")
def browser(server, tmp_path_factory):
    """Headless chromium on the server's page (skips without chromium, chromedriver and selenium)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (requirements-dev.txt)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1600,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(120)
    try:
        driver.get(server.url + "/")
        deadline = time.monotonic() + 180
        # the nodes registered and the page's websocket open (run events reach the page only through it)
        ready = ("return !!(window.app && window.app.graph && LiteGraph.registered_node_types['WeGenLoader'] "
                 "&& window.app.api?.socket?.readyState === 1)")
        while not driver.execute_script(ready):
            assert time.monotonic() < deadline, "the page never registered the WeGen nodes and opened its websocket"
            time.sleep(0.5)
        yield driver
    finally:
        driver.quit()
