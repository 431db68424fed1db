"""The bundled workflows: UI files well formed and twins of tests/workflows/*.api.json; every API workflow run
through the node classes in dependency order (stand-in host); the headless runner's rules and errors; `queue`'s
converter on them (stand-in and real host). The converter itself (Reroute, PrimitiveNode, bypass, mute) is tested in
test_workflow.py, the demo (`python demo.py`) in test_demo.py."""
from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import torch
from ComfyUI_WeGen.nodes import NODE_CLASS_MAPPINGS, headless
from ComfyUI_WeGen.wegen import workflow

from wegen import queueing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "workflows", "*.json")))
EXPECTED = {"wegen_text_to_image", "wegen_reference_guided", "wegen_understand_then_generate", "wegen_reconstruction"}


def ui(name):
    with open(os.path.join(ROOT, "workflows", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def api(name):
    with open(os.path.join(ROOT, "tests", "workflows", f"{name}.api.json"), encoding="utf-8") as f:
        return json.load(f)


def test_four_workflows_each_with_an_api_twin():
    assert set(NAMES) >= EXPECTED
    twins = {os.path.basename(p)[:-len(".api.json")] for p in glob.glob(os.path.join(ROOT, "tests", "workflows", "*"))}
    assert twins == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_well_formed(comfy_host, name):
    wf = ui(name)
    assert wf["version"] == 0.4 and {"nodes", "links", "groups", "config", "extra"} <= set(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    allowed = set(NODE_CLASS_MAPPINGS) | set(headless.CORE_STANDINS) | workflow.VIRTUAL_NODES
    assert {n["type"] for n in wf["nodes"]} <= allowed  # WeGen and core nodes only
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        assert link_id in out["links"] and out["type"] == kind
        slot = nodes[dst]["inputs"][dst_slot]
        assert slot["link"] == link_id and slot["type"] in (kind, "*")
    linked = {slot["link"] for n in wf["nodes"] for slot in n.get("inputs", []) if slot.get("link") is not None}
    assert linked == {link[0] for link in wf["links"]}
    for n in wf["nodes"]:
        if n["type"] not in workflow.VIRTUAL_NODES:
            assert n["properties"]["Node name for S&R"] == n["type"] and n["mode"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_its_api_twin(comfy_host, name):
    converted = headless.ui_to_api(ui(name))  # checks widget counts and link types against the node classes
    twin = api(name)
    assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in twin.items()}
    loaders = [n for n in twin.values() if n["class_type"] == "WeGenLoader"]
    assert loaders and all(n["inputs"]["checkpoint"] == "wegen-toy" for n in loaders)


DECODERS = ("WeGenConsistencyDecode", "WeGenReconstruct", "WeGenChatTurn", "WeGenDiversitySweep")


@pytest.mark.parametrize("name", NAMES)
def test_workflow_speaks_the_shapes_world_at_the_toy_settings(name):
    """Every prompt in the world's words; the bundled toy's recommended settings, written out explicitly."""
    from wegen import toyworld
    from wegen.loading import recommended_settings

    rec = recommended_settings("wegen-toy")
    prompt = api(name)
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        texts = {"WeGenMLLMEncode": "text", "WeGenChatTurn": "message"}
        if kind in texts and not isinstance(inputs[texts[kind]], list):  # a linked text is the model's own
            text = inputs[texts[kind]]
            assert toyworld.parse_description(text) or toyworld.parse_edit(text), (node_id, text)
        if kind == "WeGenPromptSelfRewrite":
            assert toyworld.parse_description(inputs["prompt"]) and not toyworld.is_full(
                toyworld.parse_description(inputs["prompt"])), "a vague prompt to rewrite"
        if kind == "WeGenUnderstand":
            assert inputs["question"] == toyworld.QUESTION
        if kind == "WeGenMLLMEncode":
            assert inputs["feature_slice"] == rec["feature_slice"]
        if kind in DECODERS:
            assert {k: inputs[k] for k in ("steps", "cfg", "width", "height")} == \
                   {k: rec[k] for k in ("steps", "cfg", "width", "height")}, node_id
        if kind == "SolidMask":
            assert inputs["width"] <= rec["width"] and inputs["height"] <= rec["height"]


def test_ui_to_api_catches_widget_and_link_drift(comfy_host):
    wf = ui("wegen_text_to_image")
    short = copy.deepcopy(wf)
    decode = next(n for n in short["nodes"] if n["type"] == "WeGenConsistencyDecode")
    decode["widgets_values"].pop()
    with pytest.raises(ValueError, match=r"widgets_values has 7 values .* 8 widget slots .*seed \+ control"):
        headless.ui_to_api(short)
    retyped = copy.deepcopy(wf)
    retyped["links"][0][5] = "IMAGE"
    with pytest.raises(ValueError, match="typed 'IMAGE'"):
        headless.ui_to_api(retyped)
    foreign = copy.deepcopy(wf)
    foreign["nodes"][0]["type"] = "ShowText|pysssss"
    with pytest.raises(ValueError, match="unknown node type"):
        headless.ui_to_api(foreign)


def test_workflows_saved_before_the_loaders_appended_widgets_still_convert(comfy_host):
    """As the editor does: a widget the saved workflow has no value for keeps its default, and the prompt sends it."""
    wf = ui("wegen_text_to_image")
    loader = next(n for n in wf["nodes"] if n["type"] == "WeGenLoader")
    assert loader["widgets_values"][3:] == ["comfyui", "auto", "default"]  # saved with the appended widgets
    loader["widgets_values"] = loader["widgets_values"][:3]  # saved before preset / offload / weight_dtype
    inputs = headless.ui_to_api(wf)[str(loader["id"])]["inputs"]
    assert inputs == {"checkpoint": "wegen-toy", "dtype": "auto", "device": loader["widgets_values"][2],
                      "preset": "comfyui", "offload": "auto", "weight_dtype": "default"}
    loader["widgets_values"] += ["release", "phase", "fp8_e4m3fn"]
    inputs = headless.ui_to_api(wf)[str(loader["id"])]["inputs"]
    assert (inputs["preset"], inputs["offload"], inputs["weight_dtype"]) == ("release", "phase", "fp8_e4m3fn")
    loader["widgets_values"] = loader["widgets_values"][:2]
    with pytest.raises(ValueError, match="widgets_values has 2 values but the node has 6"):
        headless.ui_to_api(wf)


def test_missing_widget_values_take_the_editors_defaults():
    info = {"input": {"required": {"n": ("INT", {"default": 4}), "pick": (["a", "b"],), "x": ("FLOAT", {}),
                                   "new": ("COMBO", {"options": ["p", "q"]}), "t": ("STRING", {}),
                                   "on": ("BOOLEAN", {})}}}
    assert workflow.widget_values({"id": 1, "type": "N", "widgets_values": [7]}, info) == {
        "n": 7, "pick": "a", "x": 0.0, "new": "p", "t": "", "on": False}


def test_seed_widgets_get_a_control_value_like_the_frontend():
    info = workflow.object_info(NODE_CLASS_MAPPINGS)
    widgets = {name: control for name, control, _ in workflow.widgets(info["WeGenConsistencyDecode"])}
    assert widgets["seed"] is True and widgets["steps"] is False
    encode = {name: control for name, control, _ in workflow.widgets(info["WeGenMLLMEncode"])}
    assert encode["seed"] is False  # explicit False wins


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_through_the_node_classes(comfy_host, tmp_path, name):
    prompt = api(name)
    for node in prompt.values():  # 2 steps keep the suite fast; the real-host test runs the files unchanged
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 2
    order = headless.execution_order(prompt, headless.node_mappings())
    for i, node_id in enumerate(order):  # dependency order
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list):
                assert order.index(value[0]) < i
    run = headless.run(prompt, str(tmp_path))
    saved = [img for shown in run.ui.values() for img in shown.get("images", [])]
    assert saved and all(os.path.isfile(tmp_path / img["subfolder"] / img["filename"]) for img in saved)
    for node_id, node in prompt.items():
        if node["class_type"] in ("WeGenConsistencyDecode", "WeGenReconstruct"):
            (images,) = run.outputs[node_id][0]
            assert images.dtype == torch.float32 and tuple(images.shape) == (1, 64, 64, 3)
    assert comfy_host.loads, "the 'gpu' policy loads modules through load_models_gpu"


# The runner's rules ---------------------------------------------------------------------------------

class Numbers:
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT", {})}}

    def make(self, n):
        return (list(range(n)),)


class Square:
    RETURN_TYPES = ("INT",)
    FUNCTION = "square"
    calls = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {})}}

    def square(self, x):
        Square.calls.append(x)
        return (x * x,)


class Total:
    RETURN_TYPES = ()
    INPUT_IS_LIST = True
    OUTPUT_NODE = True
    FUNCTION = "total"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xs": ("INT", {})}}

    def total(self, xs):
        return {"ui": {"text": [str(sum(xs))]}}


MAPPINGS = {"Numbers": Numbers, "Square": Square, "Total": Total}


def test_lists_fan_out_like_comfyui(tmp_path):
    Square.calls.clear()
    prompt = {"1": {"class_type": "Numbers", "inputs": {"n": 4}},
              "2": {"class_type": "Square", "inputs": {"x": ["1", 0]}},
              "3": {"class_type": "Total", "inputs": {"xs": ["2", 0]}},
              "4": {"class_type": "Square", "inputs": {"x": 9}}}  # no output depends on it: never runs
    run = headless.run(prompt, str(tmp_path), MAPPINGS)
    assert Square.calls == [0, 1, 2, 3] and run.outputs["2"] == [[0, 1, 4, 9]]
    assert run.ui["3"]["text"] == ["14"] and "4" not in run.outputs


@pytest.mark.parametrize("prompt, words", [
    ({"1": {"class_type": "Nope", "inputs": {}}}, ["node 1", "unknown class_type 'Nope'"]),
    ({"1": {"class_type": "Square", "inputs": {"x": 1}}}, ["no output node"]),
    ({"1": {"class_type": "Total", "inputs": {}}}, ["node 1 (Total)", "missing required input(s) ['xs']"]),
    ({"1": {"class_type": "Total", "inputs": {"xs": 1, "y": 2}}}, ["unknown input(s) ['y']"]),
    ({"1": {"class_type": "Total", "inputs": {"xs": ["5", 0]}}}, ["reads from node 5", "not in the workflow"]),
    ({"1": {"class_type": "Square", "inputs": {"x": ["2", 0]}},
      "2": {"class_type": "Square", "inputs": {"x": ["1", 0]}},
      "3": {"class_type": "Total", "inputs": {"xs": ["1", 0]}}}, ["cycle"]),
])
def test_runner_errors_name_the_node(tmp_path, prompt, words):
    with pytest.raises(ValueError) as e:
        headless.run(prompt, str(tmp_path), MAPPINGS)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_frontend_only_widget_inputs_are_ignored(tmp_path):
    prompt = {"1": {"class_type": "PreviewAny", "inputs": {"source": "hi", "preview": "", "previewMode": None}}}
    assert headless.run(prompt, str(tmp_path)).ui["1"]["text"] == ["hi"]  # what the frontend's Export (API) writes


def test_node_errors_keep_their_type_and_name_the_node(comfy_host, tmp_path):
    prompt = api("wegen_text_to_image")
    prompt["3"]["inputs"]["strength"] = 0.5  # no reference connected
    with pytest.raises(ValueError, match="needs a reference") as e:
        headless.run(prompt, str(tmp_path))
    assert "in node 3 (WeGenConsistencyDecode)" in getattr(e.value, "__notes__", [""])[0]


def test_core_standins(tmp_path):
    run = headless.Run(str(tmp_path))
    dest = headless.SolidMask(run).execute(0.0, 8, 6)[0]
    src = headless.SolidMask(run).execute(1.0, 4, 4)[0]
    (mask,) = headless.MaskComposite(run).execute(dest, src, 6, 1, "add")
    assert tuple(mask.shape) == (1, 6, 8) and mask.sum() == 2 * 4 and mask[0, 1:5, 6:8].min() == 1
    assert headless.PreviewAny(run).main({"a": 1})["ui"]["text"] == ('{\n    "a": 1\n}',)
    shown = headless.SaveImage(run).save_images(torch.rand(2, 8, 8, 3), "sub/pic")["ui"]["images"]
    assert [s["filename"] for s in shown] == ["pic_00001_.png", "pic_00002_.png"]
    assert os.path.isfile(tmp_path / "sub" / "pic_00002_.png")
    with pytest.raises(ValueError, match="filename_prefix"):
        headless.SaveImage(run).save_images(torch.rand(1, 8, 8, 3), "../escape")


# `python -m wegen queue`'s converter against our node definitions, and the real host -----------------

UI_WORKFLOWS = sorted(f[:-len(".json")] for f in os.listdir(os.path.join(ROOT, "workflows")) if f.endswith(".json"))


def _object_info(mappings) -> dict:
    """/object_info as ComfyUI 0.8 builds it from V1 node classes (server.py node_info), for our mappings."""
    from wegen.workflow import object_info

    return json.loads(json.dumps(object_info(mappings)))  # through JSON, as a client sees it


def _twin(name) -> dict:
    with open(os.path.join(ROOT, "tests", "workflows", f"{name}.api.json"), encoding="utf-8") as f:
        return json.load(f)


def _ui_file(name) -> dict:
    with open(os.path.join(ROOT, "workflows", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def _plain(api) -> dict:
    return {k: (v["class_type"], v["inputs"]) for k, v in api.items()}


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_bundled_ui_workflows_convert_to_their_api_twins(comfy_host, name):
    from ComfyUI_WeGen.nodes import headless

    converted = queueing.ui_to_api(_ui_file(name), _object_info(headless.node_mappings()))
    assert _plain(converted) == _plain(_twin(name))


def test_psr_workflow_expands_with_set(comfy_host):
    from ComfyUI_WeGen.nodes import headless

    api = queueing.ui_to_api(_ui_file("psr_diversity_sweep"), _object_info(headless.node_mappings()))
    jobs = queueing.expand_jobs(api, [queueing.parse_set("WeGen Prompt Self-Rewrite.seed=1,2"),
                                    queueing.parse_set("3.seeds=1,3")])
    assert [(p["2"]["inputs"]["seed"], p["3"]["inputs"]["seeds"]) for _, p in jobs] == [(1, 1), (1, 3), (2, 1), (2, 3)]


# The real ComfyUI: the `server` fixture of tests/comfyui_host.py (skips without COMFYUI_PATH).

@pytest.mark.integration
def test_queue_converts_every_bundled_workflow_with_the_real_object_info(server):
    info = queueing.Server(server.url).object_info()
    for name in UI_WORKFLOWS:
        assert _plain(queueing.ui_to_api(_ui_file(name), info)) == _plain(_twin(name)), name


@pytest.mark.integration
def test_queue_runs_the_psr_ui_workflow_on_the_real_host(server, tmp_path):
    out = str(tmp_path / "q")
    workflow = os.path.join(ROOT, "workflows", "psr_diversity_sweep.json")
    sets = ["WeGen Prompt Self-Rewrite.n=2", "WeGen Prompt Self-Rewrite.max_new_tokens=8", "3.steps=2",
            "3.width=64", "3.height=64", "3.seed=1,2"]
    summary = queueing.run_queue(workflow, [server.url], sets, out, max_pending=2, timeout=600, poll=0.5)
    assert (summary["done"], summary["failed"]) == (2, 0), summary["errors"]
    for job in ("job_0000", "job_0001"):
        pngs = [f for f in os.listdir(os.path.join(out, job)) if f.endswith(".png")]
        assert len(pngs) == 2 * 2 + 1  # 2 prompts x 2 seeds + the contact sheet
    again = queueing.run_queue(workflow, [server.url], sets, out, timeout=600, poll=0.5)
    assert (again["skipped"], again["done"]) == (2, 0)
