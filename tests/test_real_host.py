"""The pack inside a real ComfyUI (the `server` fixture of tests/comfyui_host.py; skipped without COMFYUI_PATH).

Checks /object_info, posts every tests/workflows/*.api.json to /prompt and waits for success in /history, checks
the UI workflows' widgets and links against the real node definitions, interrupts a long decode, and unloads
models between runs. The page itself is tests/test_js_workflows.py's.
"""
from __future__ import annotations

import glob
import json
import os
import time

import pytest
from comfyui_host import PACK_NAME, ROOT
from ComfyUI_WeGen.nodes import NODE_CLASS_MAPPINGS
from ComfyUI_WeGen.wegen import workflow

pytestmark = pytest.mark.integration
API_WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "tests", "workflows", "*.api.json")))
UI_WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))


def test_pack_loads_and_registers_every_node(server):
    log = server.log()
    pack_lines = [line for line in log.splitlines() if PACK_NAME in line]
    assert pack_lines and not [line for line in pack_lines if "IMPORT FAILED" in line], log[-4000:]
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


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=os.path.basename)
def test_ui_workflow_matches_the_real_node_definitions(server, path):
    """One widgets_values slot per widget, and links typed as the real node definitions say (the converter's
    strict mode, with the widget table read from the real /object_info)."""
    info = server.get("/object_info")
    wf, _ = workflow.load_workflow(path)
    workflow.ui_to_api(wf, info, strict=True)
    for node in wf["nodes"]:
        if node["type"] not in workflow.VIRTUAL_NODES:
            declared = workflow.input_types(info[node["type"]])
            assert all(slot["name"] in declared for slot in node.get("inputs", [])), node["type"]


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
