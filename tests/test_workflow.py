"""wegen/workflow.py, the one UI -> API converter: the frontend's graph-to-prompt rules (Reroute, PrimitiveNode,
bypass, mute, control_after_generate, frontend-only widgets), strict checks, and the bundled workflows' twins."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from wegen import workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-len(".json")] for p in glob.glob(os.path.join(ROOT, "workflows", "*.json")))
INFO = {
    "Load": {"input": {"required": {"name": [["a", "b"]]}}, "output": ["MODEL"], "display_name": "Load"},
    "Gen": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"default": 0}], "text": ["STRING", {}]},
                      "optional": {"image": ["IMAGE"]}},
            "input_order": {"required": ["model", "seed", "text"], "optional": ["image"]}, "output": ["IMAGE"]},
    "Mix": {"input": {"required": {"a": ["IMAGE"], "m": ["MASK"], "b": ["IMAGE"], "f": ["FLOAT", {}]}},
            "input_order": {"required": ["a", "m", "b", "f"]}, "output": ["IMAGE"]},
    "Save": {"input": {"required": {"images": ["IMAGE"], "prefix": ["STRING", {}]}}, "output": [], "output_node": True},
    "PreviewAny": {"input": {"required": {"source": ["*", {}]}}, "output": [], "output_node": True},
}


def graph(nodes, links):
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max((lk[0] for lk in links), default=0),
            "nodes": nodes, "links": links, "version": 0.4}


def load(nid=1, mode=0):
    return {"id": nid, "type": "Load", "mode": mode, "widgets_values": ["b"], "outputs": [{"type": "MODEL"}]}


def gen(nid=2, model_link=1, mode=0, seed=7, image_link=None, **kw):
    return {"id": nid, "type": "Gen", "mode": mode, "widgets_values": [seed, "randomize", "a cat"],
            "inputs": [{"name": "model", "type": "MODEL", "link": model_link},
                       {"name": "image", "type": "IMAGE", "link": image_link}], "outputs": [{"type": "IMAGE"}], **kw}


def save(nid, link, mode=0):
    return {"id": nid, "type": "Save", "mode": mode, "widgets_values": ["out"],
            "inputs": [{"name": "images", "type": "IMAGE", "link": link}]}


def plain(api):
    return {k: (v["class_type"], v["inputs"]) for k, v in api.items()}


def test_widgets_values_follow_input_order_and_skip_the_control_value():
    api = workflow.ui_to_api(graph([load(), gen(), save(3, 2)], [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "IMAGE"]]),
                             INFO, strict=True)
    assert plain(api) == {"1": ("Load", {"name": "b"}),
                          "2": ("Gen", {"seed": 7, "text": "a cat", "model": ["1", 0]}),  # "randomize" skipped
                          "3": ("Save", {"prefix": "out", "images": ["2", 0]})}
    assert api["1"]["_meta"] == {"title": "Load"} and api["2"]["_meta"] == {"title": "Gen"}


def test_reroutes_are_followed_through():
    reroute = [{"id": 10 + i, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 10 + i}],
                "outputs": [{"type": "*"}]} for i in range(2)]
    links = [[10, 1, 0, 10, 0, "MODEL"], [11, 10, 0, 11, 0, "MODEL"], [1, 11, 0, 2, 0, "MODEL"],
             [2, 2, 0, 3, 0, "IMAGE"]]
    api = workflow.ui_to_api(graph([load(), *reroute, gen(), save(3, 2)], links), INFO)
    assert api["2"]["inputs"]["model"] == ["1", 0] and set(api) == {"1", "2", "3"}


def test_a_primitive_node_writes_its_value_into_the_widget_it_feeds():
    primitive = {"id": 9, "type": "PrimitiveNode", "widgets_values": [123, "fixed"], "outputs": [{"type": "INT"}]}
    node = gen()
    node["inputs"].append({"name": "seed", "type": "INT", "link": 9, "widget": {"name": "seed"}})
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "IMAGE"], [9, 9, 0, 2, 2, "INT"]]
    api = workflow.ui_to_api(graph([load(), node, primitive, save(3, 2)], links), INFO, strict=True)
    assert api["2"]["inputs"]["seed"] == 123 and "9" not in api


def test_a_bypassed_node_passes_its_input_of_the_same_type_through():
    """Output k of a bypassed node -> its input k when that has the type, else its first input of the type."""
    mix = {"id": 4, "type": "Mix", "mode": 4, "widgets_values": [0.5],
           "inputs": [{"name": "a", "type": "IMAGE", "link": 4}, {"name": "m", "type": "MASK", "link": None},
                      {"name": "b", "type": "IMAGE", "link": 8}],
           "outputs": [{"type": "IMAGE"}, {"type": "MASK"}, {"type": "IMAGE"}]}
    links = [[1, 1, 0, 2, 0, "MODEL"], [7, 1, 0, 8, 0, "MODEL"], [4, 2, 0, 4, 0, "IMAGE"], [8, 8, 0, 4, 2, "IMAGE"],
             [5, 4, 0, 3, 0, "IMAGE"], [6, 4, 2, 9, 0, "IMAGE"], [3, 4, 1, 10, 0, "MASK"]]
    nodes = [load(), gen(), gen(8, model_link=7), mix, save(3, 5), save(9, 6), save(10, 3)]
    api = workflow.ui_to_api(graph(nodes, links), INFO)
    assert "4" not in api and api["3"]["inputs"]["images"] == ["2", 0]  # output 0 -> input a (slot 0)
    assert api["9"]["inputs"]["images"] == ["8", 0]  # output 2 -> input b (slot 2), not the first IMAGE input
    assert api["10"]["inputs"] == {"prefix": "out"}  # output 1 -> input m, which is not linked: nothing
    mix["inputs"][0]["type"] = "LATENT"  # slot 0 has another type: the first IMAGE input (b)
    assert workflow.ui_to_api(graph(nodes, links), INFO)["3"]["inputs"]["images"] == ["8", 0]
    mix["inputs"][2]["type"] = "LATENT"  # no IMAGE input at all: the consumer reads nothing
    assert workflow.ui_to_api(graph(nodes, links), INFO)["3"]["inputs"] == {"prefix": "out"}


def test_bypassed_chains_and_generators():
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 5, 0, "IMAGE"]]
    first = gen(3, model_link=None, image_link=2, mode=4)
    api = workflow.ui_to_api(graph([load(), gen(), first, save(5, 3)], links), INFO)
    assert api["5"]["inputs"]["images"] == ["2", 0] and "3" not in api  # IMAGE in -> IMAGE out


def test_muted_nodes_and_what_reads_them_are_dropped():
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "IMAGE"], [3, 2, 0, 4, 0, "IMAGE"]]
    api = workflow.ui_to_api(graph([load(), gen(), save(3, 2, mode=2), save(4, 3)], links), INFO)
    assert set(api) == {"1", "2", "4"}
    api = workflow.ui_to_api(graph([load(mode=2), gen(), save(4, 3)], links), INFO)
    assert set(api) == {"2", "4"} and "model" not in api["2"]["inputs"]  # its source is muted: the input goes


def test_frontend_only_widgets_and_notes_are_not_sent():
    preview = {"id": 5, "type": "PreviewAny", "widgets_values": [None, None, None],
               "inputs": [{"name": "source", "type": "*", "link": 5}]}
    note = {"id": 6, "type": "Note", "widgets_values": ["hello"]}
    markdown = {"id": 7, "type": "MarkdownNote", "widgets_values": ["# hello"]}
    links = [[1, 1, 0, 2, 0, "MODEL"], [5, 2, 0, 5, 0, "IMAGE"]]
    api = workflow.ui_to_api(graph([load(), gen(), preview, note, markdown], links), INFO, strict=True)
    assert plain(api)["5"] == ("PreviewAny", {"source": ["2", 0]}) and set(api) == {"1", "2", "5"}


def test_upload_button_value_and_dict_widgets_values():
    info = {"LoadImage": {"input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
                          "output": ["IMAGE", "MASK"]}}
    for values in (["b.png", "image"], ["b.png"]):
        api = workflow.ui_to_api({"nodes": [{"id": 1, "type": "LoadImage", "widgets_values": values}]}, info,
                                 strict=True)
        assert api["1"]["inputs"] == {"image": "b.png"}
    node = {**load(), "widgets_values": {"name": "a", "other": 1}}
    assert workflow.ui_to_api({"nodes": [node]}, INFO)["1"]["inputs"] == {"name": "a"}


@pytest.mark.parametrize("change, match", [
    (lambda g: g["nodes"][1]["widgets_values"].pop(1), r"node 2 \(Gen\): widgets_values has 2 values but the node "
                                                       r"has 3 widget slots \(seed \+ control, text\)"),
    (lambda g: g["links"][0].__setitem__(5, "IMAGE"), r"node 2 \(Gen\): link from node 1 slot 0 is typed 'IMAGE' "
                                                      r"but that output is MODEL"),
    (lambda g: g["nodes"][1]["inputs"][0].__setitem__("name", "modle"), r"node 2 \(Gen\): no input named 'modle'"),
    (lambda g: g["nodes"][1]["inputs"][0].__setitem__("link", 99), r"names link 99, which is not in 'links'"),
    (lambda g: g["nodes"][2].__setitem__("type", "Custom|pack"), r"node 3 is of type 'Custom\|pack', an unknown node"),
])
def test_strict_checks_name_the_node(change, match):
    g = graph([load(), gen(), save(3, 2)], [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "IMAGE"]])
    change(g)
    with pytest.raises(ValueError, match=match):
        workflow.ui_to_api(g, INFO, strict=True)


def test_refused_graphs():
    with pytest.raises(ValueError, match="uses subgraphs"):
        workflow.ui_to_api({"nodes": [], "definitions": {"subgraphs": [{"id": "x"}]}}, INFO)
    with pytest.raises(ValueError, match="no node to run"):
        workflow.ui_to_api({"nodes": [{"id": 1, "type": "Note"}]}, INFO)


def _pack_info():
    from ComfyUI_WeGen.nodes import headless

    return json.loads(json.dumps(workflow.object_info(headless.node_mappings())))  # as a server sends it


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_every_bundled_workflow_converts_exactly_to_its_api_twin(name, strict):
    wf, kind = workflow.load_workflow(os.path.join(ROOT, "workflows", f"{name}.json"))
    twin, twin_kind = workflow.load_workflow(os.path.join(ROOT, "tests", "workflows", f"{name}.api.json"))
    assert (kind, twin_kind) == ("ui", "api")
    assert workflow.ui_to_api(wf, _pack_info(), strict=strict) == twin  # titles included


def test_object_info_is_comfyuis_shape():
    from ComfyUI_WeGen.nodes import NODE_CLASS_MAPPINGS

    info = workflow.object_info(NODE_CLASS_MAPPINGS)["WeGenConsistencyDecode"]
    assert list(info["input_order"]["required"])[:3] == list(NODE_CLASS_MAPPINGS["WeGenConsistencyDecode"]
                                                             .INPUT_TYPES()["required"])[:3]
    assert info["output"] == ["IMAGE"] and info["display_name"] == NODE_CLASS_MAPPINGS["WeGenConsistencyDecode"].TITLE


def test_the_module_is_stdlib_only():
    code = ("import sys; import wegen.workflow; "
            "assert not {'torch', 'numpy', 'folder_paths', 'comfy'} & set(sys.modules), sorted(sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
