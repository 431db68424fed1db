"""`queue` (extension): UI->API conversion, --set expansion, round-robin over servers, downloads, resume, errors.

The servers are a small stand-in for ComfyUI's HTTP API (POST /prompt, GET /history/<id>, /queue, /view,
/object_info) on 127.0.0.1 in a thread; the real host is tried when COMFYUI_PATH is set (in tests/test_workflows.py,
with the bundled workflows).
"""
from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wegen import queueing

SEED_MAX = 0xFFFFFFFFFFFFFFFF
OBJECT_INFO = {
    "Loader": {"input": {"required": {"ckpt": [["tiny", "big"]]}}, "input_order": {"required": ["ckpt"]},
               "output": ["MODEL"], "display_name": "Model Loader"},
    "Sampler": {
        "input": {"required": {"model": ["MODEL"],
                               "seed": ["INT", {"default": 0, "min": 0, "max": SEED_MAX,
                                                "control_after_generate": True}],
                               "steps": ["INT", {"default": 20, "min": 1}], "cfg": ["FLOAT", {"default": 7.0}],
                               "sampler_name": [["euler", "heun"]], "prompt": ["STRING", {"multiline": True}]},
                  "optional": {"denoise": ["FLOAT", {"default": 1.0}], "extra": ["IMAGE", {}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "prompt"],
                        "optional": ["denoise", "extra"]},
        "output": ["IMAGE"], "display_name": "Sampler"},
    "LoadImage": {"input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"], "display_name": "Load Image"},
    "Blend": {"input": {"required": {"image1": ["IMAGE"], "image2": ["IMAGE"], "factor": ["FLOAT", {"default": 0.5}]}},
              "input_order": {"required": ["image1", "image2", "factor"]}, "output": ["IMAGE"]},
    "NoiseSeed": {"input": {"required": {"noise_seed": ["INT", {"default": 0}], "label": ["STRING", {}]}},
                  "output": ["INT"]},  # no input_order: the older /object_info; legacy seed name
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "input_order": {"required": ["images", "filename_prefix"]}, "output": [], "output_node": True},
    "PreviewAny": {"input": {"required": {"source": ["*", {}]}}, "input_order": {"required": ["source"]},
                   "output": [], "output_node": True},
}
API = {
    "1": {"class_type": "Loader", "inputs": {"ckpt": "tiny"}, "_meta": {"title": "Model Loader"}},
    "2": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 2, "cfg": 2.0,
                                               "sampler_name": "euler", "prompt": "a cat"}, "_meta": {"title": "Main"}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "q"},
          "_meta": {"title": "Save"}},
    "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}, "_meta": {"title": "Show"}},
}


# The stand-in server ------------------------------------------------------------------------------

class StandIn:
    """ComfyUI's HTTP surface, enough for queue: jobs 'run' in a worker thread and save one 'image' each."""

    def __init__(self, object_info=OBJECT_INFO):
        self.object_info = object_info
        self.received = []  # prompts in arrival order
        self.history, self.files, self.queue = {}, {}, []
        self.hold = threading.Event()  # set: jobs stay queued
        self.cond = threading.Condition()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.closed = False
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        threading.Thread(target=self._work, daemon=True).start()

    def close(self):
        self.closed = True
        with self.cond:
            self.cond.notify_all()
        self.http.shutdown()
        self.http.server_close()

    def submit(self, prompt: dict):
        errors = {}
        for nid, node in prompt.items():
            info = self.object_info.get(node.get("class_type"))
            if info is None:
                return 400, {"error": {"type": "invalid_prompt", "message": f"node {node.get('class_type')} does "
                                                                             f"not exist"}, "node_errors": {}}
            for name, spec in info["input"].get("required", {}).items():
                value, opts = node["inputs"].get(name), (spec[1] if len(spec) > 1 else {})
                if isinstance(value, (int, float)) and "min" in opts and value < opts["min"]:
                    errors[nid] = {"class_type": node["class_type"], "errors": [
                        {"type": "value_smaller_than_min", "message": "Value smaller than min",
                         "details": f"{name}: {value} < {opts['min']}"}]}
        if errors:
            return 400, {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed "
                                                                                         "validation"},
                         "node_errors": errors}
        pid = uuid.uuid4().hex
        with self.cond:
            self.received.append(prompt)
            self.queue.append((pid, prompt))
            self.cond.notify_all()
        return 200, {"prompt_id": pid, "number": len(self.received), "node_errors": {}}

    def _work(self):
        while not self.closed:
            with self.cond:
                while not self.closed and (not self.queue or self.hold.is_set()):
                    self.cond.wait(0.02)
                if self.closed:
                    return
                pid, prompt = self.queue.pop(0)
            self.history[pid] = self._run(pid, prompt)

    def _run(self, pid, prompt):
        outputs = {}
        for nid, node in prompt.items():
            if any(v == "FAIL" for v in node["inputs"].values()):
                return {"prompt": [0, pid, prompt, {}, []], "outputs": {}, "status": {
                    "status_str": "error", "completed": False, "messages": [
                        ["execution_error", {"node_id": nid, "node_type": node["class_type"],
                                             "exception_message": "boom"}]]}}
            if node["class_type"] == "SaveImage":
                name = f"{node['inputs']['filename_prefix']}_{pid[:8]}.png"
                self.files[(name, "", "output")] = json.dumps(prompt, sort_keys=True).encode()
                outputs[nid] = {"images": [{"filename": name, "subfolder": "", "type": "output"}]}
            if node["class_type"] == "PreviewAny":
                outputs[nid] = {"text": [f"seed {prompt['2']['inputs']['seed']}"]}
        return {"prompt": [0, pid, prompt, {}, list(outputs)], "outputs": outputs,
                "status": {"status_str": "success", "completed": True, "messages": []}}


def _handler(standin: StandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code, body, kind="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/prompt":
                return self._send(404, {})
            self._send(*standin.submit(body["prompt"]))

        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            if url.path == "/object_info":
                return self._send(200, standin.object_info)
            if url.path == "/queue":
                with standin.cond:
                    pending = [[i, pid, p, {}, []] for i, (pid, p) in enumerate(standin.queue)]
                return self._send(200, {"queue_running": [], "queue_pending": pending})
            if url.path.startswith("/history/"):
                pid = url.path.split("/")[-1]
                return self._send(200, {pid: standin.history[pid]} if pid in standin.history else {})
            if url.path == "/view":
                key = (query.get("filename"), query.get("subfolder", ""), query.get("type"))
                return self._send(200, standin.files[key], "image/png") if key in standin.files else self._send(404, {})
            self._send(404, {})

    return Handler


@pytest.fixture
def servers():
    made = [StandIn(), StandIn()]
    yield made
    for s in made:
        s.close()


def _write(path, data) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return str(path)


def _quick(**kw):
    return {"max_pending": 1, "timeout": 20.0, "poll": 0.02, **kw}


# UI -> API ---------------------------------------------------------------------------------------

def _ui(dict_links=False):
    links = [[1, 1, 0, 10, 0, "MODEL"], [2, 10, 0, 2, 0, "MODEL"], [3, 2, 0, 6, 0, "IMAGE"], [4, 4, 0, 6, 1, "IMAGE"],
             [5, 6, 0, 5, 0, "IMAGE"], [6, 4, 0, 5, 1, "IMAGE"], [7, 5, 0, 7, 0, "IMAGE"], [8, 2, 0, 9, 0, "IMAGE"],
             [9, 11, 0, 12, 0, "INT"]]
    if dict_links:
        links = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), lk)) for lk in links]
    image_in = [{"name": "image1", "type": "IMAGE", "link": None}, {"name": "image2", "type": "IMAGE", "link": None}]
    nodes = [
        {"id": 1, "type": "Loader", "mode": 0, "widgets_values": ["tiny"], "outputs": [{"type": "MODEL"}]},
        {"id": 10, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}], "outputs": [{"type": "MODEL"}]},
        {"id": 2, "type": "Sampler", "title": "Main", "inputs": [{"name": "model", "type": "MODEL", "link": 2},
                                                                {"name": "extra", "type": "IMAGE", "link": None}],
         "widgets_values": [7, "randomize", 3, 2.5, "heun", "a dog", 0.8], "outputs": [{"type": "IMAGE"}]},
        {"id": 4, "type": "LoadImage", "widgets_values": ["b.png", "image"], "outputs": [{"type": "IMAGE"}]},
        {"id": 6, "type": "Blend", "mode": 4, "inputs": [dict(image_in[0], link=3), dict(image_in[1], link=4)],
         "widgets_values": [0.9], "outputs": [{"type": "IMAGE"}]},
        {"id": 5, "type": "Blend", "inputs": [dict(image_in[0], link=5), dict(image_in[1], link=6)],
         "widgets_values": [0.3], "outputs": [{"type": "IMAGE"}]},
        {"id": 7, "type": "SaveImage", "inputs": [{"name": "images", "type": "IMAGE", "link": 7}],
         "widgets_values": ["out"]},
        {"id": 8, "type": "Note", "widgets_values": ["just a note"]},
        {"id": 9, "type": "SaveImage", "mode": 2, "inputs": [{"name": "images", "type": "IMAGE", "link": 8}],
         "widgets_values": ["muted"]},
        {"id": 11, "type": "PrimitiveNode", "widgets_values": [123, "fixed"], "outputs": [{"type": "INT"}]},
        {"id": 12, "type": "NoiseSeed", "inputs": [{"name": "noise_seed", "type": "INT", "link": 9,
                                                    "widget": {"name": "noise_seed"}}],
         "widgets_values": [5, "increment", "hi"]},
    ]
    return {"last_node_id": 12, "last_link_id": 9, "nodes": nodes, "links": links, "version": 0.4}


EXPECTED = {
    "1": ("Loader", {"ckpt": "tiny"}),
    "2": ("Sampler", {"seed": 7, "steps": 3, "cfg": 2.5, "sampler_name": "heun", "prompt": "a dog", "denoise": 0.8,
                      "model": ["1", 0]}),
    "4": ("LoadImage", {"image": "b.png"}),
    "5": ("Blend", {"factor": 0.3, "image1": ["2", 0], "image2": ["4", 0]}),
    "7": ("SaveImage", {"filename_prefix": "out", "images": ["5", 0]}),
    "12": ("NoiseSeed", {"noise_seed": 123, "label": "hi"}),
}


@pytest.mark.parametrize("dict_links", [False, True])
def test_ui_to_api_follows_the_editor(dict_links):
    api = queueing.ui_to_api(_ui(dict_links), OBJECT_INFO)
    assert {k: (v["class_type"], v["inputs"]) for k, v in api.items()} == EXPECTED
    assert api["2"]["_meta"]["title"] == "Main" and api["1"]["_meta"]["title"] == "Model Loader"


def test_ui_to_api_refuses_what_it_cannot_convert():
    ui = _ui()
    ui["nodes"].append({"id": 20, "type": "FancyThirdPartyNode", "widgets_values": []})
    with pytest.raises(ValueError, match="node 20 is of type 'FancyThirdPartyNode', an unknown node type"):
        queueing.ui_to_api(ui, OBJECT_INFO)
    with pytest.raises(ValueError, match="uses subgraphs"):
        queueing.ui_to_api({**_ui(), "definitions": {"subgraphs": [{"id": "x"}]}}, OBJECT_INFO)


def test_load_workflow_kinds_and_errors(tmp_path):
    assert queueing.load_workflow(_write(tmp_path / "a.json", API))[1] == "api"
    assert queueing.load_workflow(_write(tmp_path / "u.json", _ui()))[1] == "ui"
    with pytest.raises(FileNotFoundError, match="workflow not found: .*missing.json"):
        queueing.load_workflow(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read workflow"):
        queueing.load_workflow(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="neither a UI-format workflow .* nor an API-format"):
        queueing.load_workflow(_write(tmp_path / "other.json", {"a": 1}))


# --set -------------------------------------------------------------------------------------------

def test_set_expands_to_the_cartesian_product_by_id_title_or_class():
    sets = [queueing.parse_set("Main.seed=1,2"), queueing.parse_set("3.filename_prefix=a\\,b,c"),
            queueing.parse_set("Loader.ckpt=big")]
    jobs = queueing.expand_jobs(API, sets)
    assert [o for o, _ in jobs] == [
        {"Main.seed": 1, "3.filename_prefix": "a,b", "Loader.ckpt": "big"},
        {"Main.seed": 1, "3.filename_prefix": "c", "Loader.ckpt": "big"},
        {"Main.seed": 2, "3.filename_prefix": "a,b", "Loader.ckpt": "big"},
        {"Main.seed": 2, "3.filename_prefix": "c", "Loader.ckpt": "big"}]
    assert jobs[2][1]["2"]["inputs"]["seed"] == 2 and API["2"]["inputs"]["seed"] == 1  # a copy per job
    sets = [queueing.parse_set("2.cfg=3"), queueing.parse_set("2.prompt=7")]
    cast = queueing.expand_jobs(API, sets)[0][1]["2"]["inputs"]
    assert cast["cfg"] == 3.0 and isinstance(cast["cfg"], float) and cast["prompt"] == "7"


@pytest.mark.parametrize("text, match", [
    ("Main.seed", r"--set must look like NODE\.INPUT=v1,v2"), ("seed=1", r"--set must look like"),
    (".seed=1", "--set must look like"), ("Main.seed=", "give one or more comma-separated values"),
    ("Main.seed=1,,2", "give one or more comma-separated values"),
])
def test_parse_set_errors(text, match):
    with pytest.raises(ValueError, match=match):
        queueing.parse_set(text)


@pytest.mark.parametrize("text, match", [
    ("Nope.seed=1", r"--set node 'Nope' is not in the workflow; nodes: 1 \(Model Loader\), 2 \(Main\)"),
    ("Main.sed=1", r"--set Main\.sed: node 2 \(Sampler\) has no input 'sed'; its inputs: model, seed, steps"),
    ("Main.model=x", "that input is linked to node 1; --set only changes widget values"),
    ("Main.steps=two", r"--set Main\.steps: 'two' is not a valid int \(the input holds 2\)"),
    ("Dup.seed=1", "--set node 'Dup' is ambiguous: title of nodes 2, 5; use the node id"),
])
def test_set_errors_name_the_node_and_input(text, match):
    api = copy.deepcopy(API)
    if text.startswith("Dup"):
        api["2"]["_meta"]["title"] = "Dup"
        api["5"] = copy.deepcopy(api["2"])
    with pytest.raises(ValueError, match=match):
        queueing.expand_jobs(api, [queueing.parse_set(text)])


# Queueing ----------------------------------------------------------------------------------------

def test_cli_queue_round_robin_two_servers_downloads_everything(servers, tmp_path, capsys):
    from wegen.cli import main

    wf = _write(tmp_path / "wf.api.json", API)
    out = str(tmp_path / "out")
    rc = main(["queue", wf, "--server", servers[0].url, "--server", servers[1].url + "/", "--set", "Main.seed=1,2,3",
               "--set", "2.steps=4,5", "--out", out, "--max-pending", "1", "--poll", "0.02"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert rc == 0 and lines[-1] == {"summary": True, "jobs": 6, "done": 6, "skipped": 0, "failed": 0, "out": out}
    jobs = sorted(lines[:-1], key=lambda r: r["index"])
    assert [r["status"] for r in jobs] == ["done"] * 6
    assert [r["server"] for r in jobs] == [servers[0].url, servers[1].url] * 3  # round-robin
    assert [len(s.received) for s in servers] == [3, 3]
    for r in jobs:
        saved = [f for f in r["files"] if f.endswith(".png")]
        assert len(saved) == 1 and saved[0].startswith(f"job_{r['index']:04d}/3-q_")
        with open(os.path.join(out, saved[0]), encoding="utf-8") as f:
            sent = json.load(f)
        assert (sent["2"]["inputs"]["seed"], sent["2"]["inputs"]["steps"]) == (r["overrides"]["Main.seed"],
                                                                               r["overrides"]["2.steps"])
        with open(os.path.join(out, f"job_{r['index']:04d}", "outputs.json"), encoding="utf-8") as f:
            record = json.load(f)
        assert record["values"] == {"4": {"text": [f"seed {r['overrides']['Main.seed']}"]}}
    assert [(r["overrides"]["Main.seed"], r["overrides"]["2.steps"]) for r in jobs] == \
        [(1, 4), (1, 5), (2, 4), (2, 5), (3, 4), (3, 5)]


def test_rerun_skips_finished_jobs_and_runs_only_new_ones(servers, tmp_path):
    wf, out = _write(tmp_path / "wf.json", API), str(tmp_path / "out")
    first = queueing.run_queue(wf, [servers[0].url], ["Main.seed=1,2"], out, **_quick())
    assert (first["done"], first["skipped"]) == (2, 0)
    seen = []
    again = queueing.run_queue(wf, [servers[0].url, servers[1].url], ["Main.seed=1,2,3"], out,
                             report=seen.append, **_quick())
    assert (again["jobs"], again["done"], again["skipped"]) == (3, 1, 2)
    assert [p["2"]["inputs"]["seed"] for s in servers for p in s.received] == [1, 2, 3]
    assert [r.get("skipped", False) for r in seen] == [True, True, False]


def test_rerun_keeps_waiting_for_jobs_still_queued_on_their_server(servers, tmp_path):
    wf, out = _write(tmp_path / "wf.json", API), str(tmp_path / "out")
    servers[0].hold.set()
    cut = queueing.run_queue(wf, [servers[0].url], ["Main.seed=7"], out, **_quick(timeout=0.2))
    assert cut["failed"] == 1 and "still unfinished" in cut["errors"][0] and "rerun to keep waiting" in cut["errors"][0]
    with open(os.path.join(out, queueing.STATE), encoding="utf-8") as f:
        assert [j["status"] for j in json.load(f)["jobs"].values()] == ["submitted"]
    servers[0].hold.clear()
    done = queueing.run_queue(wf, [servers[0].url], ["Main.seed=7"], out, **_quick())
    assert done["done"] == 1 and len(servers[0].received) == 1  # collected, not submitted again


def test_ui_workflow_is_converted_with_the_servers_object_info(servers, tmp_path):
    ui = _ui()
    ui["nodes"] = [n for n in ui["nodes"] if n["id"] != 12]  # NoiseSeed has no output: not runnable
    wf = _write(tmp_path / "wf.json", ui)
    summary = queueing.run_queue(wf, [servers[0].url], ["Main.seed=8"], str(tmp_path / "out"), **_quick())
    assert summary["done"] == 1
    sent = servers[0].received[0]
    assert {k: (v["class_type"], v["inputs"]) for k, v in sent.items()} == \
        {**{k: v for k, v in EXPECTED.items() if k != "12"}, "2": ("Sampler", {**EXPECTED["2"][1], "seed": 8})}


def test_failed_job_is_reported_and_the_others_finish(servers, tmp_path, capsys):
    from wegen.cli import main

    wf = _write(tmp_path / "wf.json", API)
    rc = main(["queue", wf, "--server", servers[0].url, "--set", "Main.prompt=ok,FAIL,fine", "--out",
               str(tmp_path / "out"), "--poll", "0.02"])
    captured = capsys.readouterr()
    assert rc == 1 and "error: 1 of 3 jobs failed: job 1 failed on" in captured.err
    assert "execution_error in node 2 (Sampler): boom" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["done"] == 2


def test_server_validation_error_is_a_clear_error(servers, tmp_path):
    wf = _write(tmp_path / "wf.json", API)
    with pytest.raises(queueing.RemoteError,
                       match=r"refused POST /prompt \(HTTP 400\): Prompt outputs failed validation "
                             r"\[node 2 \(Sampler\): Value smaller than min steps: 0 < 1"):
        queueing.run_queue(wf, [servers[0].url], ["Main.steps=0"], str(tmp_path / "out"), **_quick())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_exit_2_one_line(servers, tmp_path, capsys):
    from wegen.cli import main

    wf = _write(tmp_path / "wf.json", API)
    dead = f"http://127.0.0.1:{_closed_port()}"
    rc = main(["queue", wf, "--server", servers[0].url, "--server", dead, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: cannot reach ComfyUI at {dead} (GET /queue)")
    assert len(err.strip().splitlines()) == 1 and servers[0].received == []


@pytest.mark.parametrize("servers_arg, kw, match", [
    ([], {}, "give at least one --server URL"),
    (["ftp://host:1"], {}, "--server must be an http"),
    (["http://127.0.0.1:1"], {"max_pending": 0}, r"max_pending .* must be >= 1, got 0"),
    (["http://127.0.0.1:1"], {"timeout": 0}, r"timeout \(seconds per job\) must be > 0"),
    (["http://127.0.0.1:1"], {"poll": -1}, r"poll .* must be > 0"),
])
def test_bad_queue_inputs(tmp_path, servers_arg, kw, match):
    wf = _write(tmp_path / "wf.json", API)
    with pytest.raises(ValueError, match=match):
        queueing.run_queue(wf, servers_arg, [], str(tmp_path / "out"), **kw)


def test_cli_set_error_exit_2(servers, tmp_path, capsys):
    from wegen.cli import main

    wf = _write(tmp_path / "wf.json", API)
    rc = main(["queue", wf, "--server", servers[0].url, "--set", "Main.nope=1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--set Main.nope: node 2 (Sampler) has no input 'nope'" in err and servers[0].received == []
    rc = main(["queue", wf, "--server", servers[0].url, "--set", "Main.seed=1,1", "--out", str(tmp_path / "out")])
    assert rc == 2 and "two jobs would be the same prompt" in capsys.readouterr().err


def test_wait_does_not_spin_forever_on_a_quiet_server(servers, tmp_path):
    """Timeout bounds the wait even when the server never finishes a job."""
    servers[0].hold.set()
    start = time.time()
    summary = queueing.run_queue(_write(tmp_path / "wf.json", API), [servers[0].url], [], str(tmp_path / "out"),
                               **_quick(timeout=0.3))
    assert summary["failed"] == 1 and time.time() - start < 10
