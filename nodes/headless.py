"""Headless graph runner: executes an API-format workflow through NODE_CLASS_MAPPINGS without ComfyUI,
and turns the UI-format workflows of workflows/ into API format.

Follows the parts of ComfyUI 0.8's execution.py that our graphs rely on: only output nodes and their
ancestors run, in dependency order; every value travels as a list and a node runs once per index
(shorter lists repeat their last item) unless INPUT_IS_LIST; OUTPUT_IS_LIST outputs are concatenated;
a node returns a tuple or {"ui": ..., "result": (...)}. No caching, lazy inputs or node expansion.
The core nodes the bundled workflows use (SaveImage, PreviewImage, PreviewAny, SolidMask, MaskComposite)
have small stand-ins here, written for runs without ComfyUI; ComfyUI itself uses its own.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import host

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # virtual: never sent to the server
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds "control after generate" to these INTs by default


@dataclass
class Run:
    """One headless execution: where files go, what each node returned and showed."""

    output_dir: str
    outputs: dict = field(default_factory=dict)  # node id -> [list per output slot]
    ui: dict = field(default_factory=dict)  # node id -> {"images": [...], "text": [...]}
    counters: dict = field(default_factory=dict)  # filename prefix -> last number used in this run


# Core-node stand-ins ------------------------------------------------------------------------------

class SaveImage:
    """Stand-in for core SaveImage: <output_dir>/<prefix>_00001_.png, numbered per run (a rerun overwrites)."""

    HEADLESS = True
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    FILE_TYPE = "output"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def __init__(self, run: Run):
        self.run = run

    def save_images(self, images, filename_prefix="ComfyUI"):
        subfolder, prefix = os.path.split(os.path.normpath(filename_prefix))
        if subfolder.startswith("..") or os.path.isabs(subfolder) or not prefix:
            raise ValueError(f"filename_prefix must be a name inside the output folder, got {filename_prefix!r}")
        folder = os.path.join(self.run.output_dir, subfolder)
        os.makedirs(folder, exist_ok=True)
        saved = []
        for image in images:
            n = self.run.counters.get(filename_prefix, 0) + 1
            self.run.counters[filename_prefix] = n
            filename = f"{prefix}_{n:05d}_.png"
            host.wegen("images").save_png(image, os.path.join(folder, filename))
            saved.append({"filename": filename, "subfolder": subfolder, "type": self.FILE_TYPE})
        return {"ui": {"images": saved}}


class PreviewImage(SaveImage):
    """Stand-in for core PreviewImage: like SaveImage, under the prefix 'preview'."""

    FILE_TYPE = "temp"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def save_images(self, images, filename_prefix="preview"):
        return super().save_images(images, filename_prefix)


class PreviewAny:
    """Stand-in for core PreviewAny ("Preview as Text"): shows a value as text."""

    HEADLESS = True
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "main"
    FRONTEND_WIDGETS = ("preview", "preview", "previewMode")  # added by the frontend (markdown, text, toggle)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("*", {})}}

    def __init__(self, run: Run):
        self.run = run

    def main(self, source=None):
        if isinstance(source, str):
            text = source
        elif isinstance(source, (int, float, bool)):
            text = str(source)
        else:
            try:
                text = json.dumps(source, indent=4)
            except TypeError:
                text = str(source)
        return {"ui": {"text": (text,)}}


class SolidMask:
    """Stand-in for core SolidMask: a (1, height, width) mask filled with value."""

    HEADLESS = True
    RETURN_TYPES = ("MASK",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                             "width": ("INT", {"default": 512, "min": 1, "max": 16384}),
                             "height": ("INT", {"default": 512, "min": 1, "max": 16384})}}

    def __init__(self, run: Run):
        pass

    def execute(self, value, width, height):
        import torch

        return (torch.full((1, height, width), float(value), dtype=torch.float32),)


class MaskComposite:
    """Stand-in for core MaskComposite: source combined into destination at (x, y), clamped to 0..1."""

    HEADLESS = True
    RETURN_TYPES = ("MASK",)
    FUNCTION = "execute"
    OPERATIONS = ("multiply", "add", "subtract", "and", "or", "xor")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"destination": ("MASK",), "source": ("MASK",),
                             "x": ("INT", {"default": 0, "min": 0, "max": 16384}),
                             "y": ("INT", {"default": 0, "min": 0, "max": 16384}),
                             "operation": (list(cls.OPERATIONS),)}}

    def __init__(self, run: Run):
        pass

    def execute(self, destination, source, x, y, operation):
        if operation not in self.OPERATIONS:
            raise ValueError(f"operation must be one of {list(self.OPERATIONS)}, got {operation!r}")
        out = destination.reshape(-1, *destination.shape[-2:]).clone()  # (B, H, W)
        src = source.reshape(-1, *source.shape[-2:])
        h, w = max(0, min(src.shape[-2], out.shape[-2] - y)), max(0, min(src.shape[-1], out.shape[-1] - x))
        dst, src = out[:, y:y + h, x:x + w], src[:, :h, :w]
        if operation in ("and", "or", "xor"):
            a, b = dst.round().bool(), src.round().bool()
            combined = {"and": a & b, "or": a | b, "xor": a ^ b}[operation].float()
        else:
            combined = {"multiply": dst * src, "add": dst + src, "subtract": dst - src}[operation]
        out[:, y:y + h, x:x + w] = combined
        return (out.clamp(0, 1),)


CORE_STANDINS = {cls.__name__: cls for cls in (SaveImage, PreviewImage, PreviewAny, SolidMask, MaskComposite)}


def node_mappings() -> dict:
    """WeGen nodes + core stand-ins: everything a headless run can execute."""
    from . import NODE_CLASS_MAPPINGS

    return {**CORE_STANDINS, **NODE_CLASS_MAPPINGS}


# Node signatures --------------------------------------------------------------------------------

def input_specs(cls) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, optional) of every required then optional input, in widget order."""
    spec = cls.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            options = entry[1] if len(entry) > 1 else {}
            specs.append((name, "COMBO" if isinstance(kind, (list, tuple)) else kind, options, section == "optional"))
    return specs


def widgets(cls) -> list[tuple[str, bool]]:
    """(name, followed by a 'control after generate' value) for each widget, in the order of widgets_values."""
    out = []
    for name, kind, options, _ in input_specs(cls):
        if kind not in WIDGET_TYPES or options.get("forceInput"):
            continue
        control = options.get("control_after_generate", kind == "INT" and name in SEED_NAMES)
        out.append((name, bool(control)))
    return out


# UI format -> API format ----------------------------------------------------------------------------

def ui_to_api(workflow: dict, mappings: dict | None = None) -> dict:
    """A UI-format workflow (what the ComfyUI canvas saves) -> the API-format prompt it queues.

    Checks on the way: every node type is known, widgets_values has one value per widget (+ one after each
    seed-style widget, + the frontend's own widgets), and every link joins an output and an input of the
    same type.
    """
    mappings = mappings or node_mappings()
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES:
            continue
        where = f"node {node['id']} ({node['type']})"
        if node.get("mode", 0) != 0:
            raise ValueError(f"{where} is muted or bypassed; headless runs need every node active")
        if node["type"] not in mappings:
            raise ValueError(f"{where}: unknown node type; known: {sorted(mappings)}")
        cls = mappings[node["type"]]
        inputs = _widget_values(cls, node.get("widgets_values") or [], where)
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            _, src, src_slot, dst, dst_slot, kind = links[slot["link"]]
            if dst != node["id"]:
                raise ValueError(f"{where}: link {slot['link']} ends at node {dst}, not here")
            _check_link_type(mappings, nodes[src], src_slot, cls, slot["name"], kind, where)
            inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or getattr(cls, "TITLE", node["type"])}}
    return prompt


def _widget_values(cls, values: list, where: str) -> dict:
    names = widgets(cls)
    expected = len(names) + sum(control for _, control in names) + len(getattr(cls, "FRONTEND_WIDGETS", ()))
    appended = set(getattr(cls, "APPENDED_WIDGETS", ()))  # added later at the end of "optional": a workflow
    tail = 0  # saved before has no value for them
    while tail < len(names) and names[-1 - tail][0] in appended and not names[-1 - tail][1]:
        tail += 1
    if not getattr(cls, "FRONTEND_WIDGETS", ()) and expected - tail <= len(values) < expected:
        names = names[:len(values)]  # as the frontend does: the missing trailing widgets keep their defaults
    elif len(values) != expected:
        raise ValueError(f"{where}: widgets_values has {len(values)} values but the node has {expected} widget "
                         f"slots ({', '.join(n + (' + control' if c else '') for n, c in names)})")
    inputs, k = {}, 0
    for name, control in names:
        inputs[name] = values[k]
        k += 2 if control else 1
    return inputs


def _check_link_type(mappings, src_node, src_slot, dst_cls, dst_name, kind, where):
    src_types = mappings[src_node["type"]].RETURN_TYPES
    if src_slot >= len(src_types) or src_types[src_slot] != kind:
        raise ValueError(f"{where}: link from node {src_node['id']} slot {src_slot} is typed {kind!r} but that "
                         f"output is {src_types[src_slot] if src_slot < len(src_types) else 'missing'}")
    declared = {name: t for name, t, _, _ in input_specs(dst_cls)}
    if dst_name not in declared:
        raise ValueError(f"{where}: no input named {dst_name!r}")
    if declared[dst_name] not in (kind, "*"):
        raise ValueError(f"{where}: input {dst_name!r} takes {declared[dst_name]} but is linked to a {kind}")


# Running an API-format prompt ---------------------------------------------------------------------

def execution_order(prompt: dict, mappings: dict) -> list[str]:
    """Output nodes and their ancestors, each after everything it reads from."""
    for node_id, node in prompt.items():
        if node.get("class_type") not in mappings:
            raise ValueError(f"node {node_id}: unknown class_type {node.get('class_type')!r}; headless runs know "
                             f"{sorted(mappings)}")
    wanted = [n for n, node in prompt.items() if getattr(mappings[node["class_type"]], "OUTPUT_NODE", False)]
    if not wanted:
        raise ValueError("the workflow has no output node (SaveImage, PreviewImage, PreviewAny ...): nothing to run")
    order, state = [], {}  # state: 1 = visiting, 2 = done

    def visit(node_id, path):
        if state.get(node_id) == 2:
            return
        if state.get(node_id) == 1:
            raise ValueError(f"the workflow has a cycle through nodes {path + [node_id]}")
        if node_id not in prompt:
            raise ValueError(f"node {path[-1]} reads from node {node_id}, which is not in the workflow")
        state[node_id] = 1
        for value in prompt[node_id]["inputs"].values():
            if _is_link(value):
                visit(str(value[0]), path + [node_id])
        state[node_id] = 2
        order.append(node_id)

    for node_id in sorted(wanted, key=_id_key):
        visit(node_id, [])
    return order


def run(prompt: dict, output_dir: str, mappings: dict | None = None) -> Run:
    """Execute an API-format prompt; files go under output_dir. Returns the Run (outputs + ui per node)."""
    mappings = mappings or node_mappings()
    run_state = Run(os.path.abspath(output_dir))
    os.makedirs(run_state.output_dir, exist_ok=True)
    with host.output_to(run_state.output_dir):  # nodes that write files themselves (chat sessions) write here
        for node_id in execution_order(prompt, mappings):
            node = prompt[node_id]
            try:
                _execute(node_id, node, mappings[node["class_type"]], prompt, run_state)
            except Exception as e:
                if hasattr(e, "add_note"):  # Python 3.11+
                    e.add_note(f"in node {node_id} ({node['class_type']})")
                raise
    return run_state


def _execute(node_id: str, node: dict, cls, prompt: dict, run_state: Run) -> None:
    inputs = _gather_inputs(node_id, node, cls, prompt, run_state)
    obj = cls(run_state) if getattr(cls, "HEADLESS", False) else cls()
    fn = getattr(obj, cls.FUNCTION)
    if getattr(cls, "INPUT_IS_LIST", False):
        calls = [inputs]
    else:
        n = max((len(v) for v in inputs.values()), default=1) if all(inputs.values()) else 0
        calls = [{k: v[min(i, len(v) - 1)] for k, v in inputs.items()} for i in range(n)]
    results = []
    for kwargs in calls:
        result = fn(**kwargs)
        if isinstance(result, dict):
            for key, value in (result.get("ui") or {}).items():
                run_state.ui.setdefault(node_id, {}).setdefault(key, []).extend(value)
            result = result.get("result", ())
        result = tuple(result or ())
        if len(result) != len(cls.RETURN_TYPES):
            raise ValueError(f"{cls.__name__} returned {len(result)} values for RETURN_TYPES {cls.RETURN_TYPES}")
        results.append(result)
    is_list = getattr(cls, "OUTPUT_IS_LIST", (False,) * len(cls.RETURN_TYPES))
    run_state.outputs[node_id] = [
        [item for r in results for item in r[j]] if is_list[j] else [r[j] for r in results]
        for j in range(len(cls.RETURN_TYPES))]


def _gather_inputs(node_id, node, cls, prompt, run_state) -> dict:
    """Every input as a list: linked outputs as computed, constants as one-item lists, hidden ones filled."""
    spec = cls.INPUT_TYPES()
    given = node.get("inputs", {})
    missing = [name for name in spec.get("required", {}) if name not in given]
    if missing:
        raise ValueError(f"node {node_id} ({node['class_type']}) is missing required input(s) {missing}")
    known = set(spec.get("required", {})) | set(spec.get("optional", {}))
    frontend_only = getattr(cls, "FRONTEND_WIDGETS", ())  # "Export (API)" includes them; ComfyUI ignores them
    given = {k: v for k, v in given.items() if k not in frontend_only}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"node {node_id} ({node['class_type']}) has unknown input(s) {unknown}; it takes "
                         f"{sorted(known)}")
    inputs = {}
    for name, value in given.items():
        if _is_link(value):
            src, slot = str(value[0]), value[1]
            inputs[name] = run_state.outputs[src][slot]
        else:
            inputs[name] = [value]
    hidden_values = {"UNIQUE_ID": node_id, "PROMPT": prompt, "EXTRA_PNGINFO": None, "DYNPROMPT": None}
    for name, kind in spec.get("hidden", {}).items():
        inputs[name] = [hidden_values.get(kind)]
    return inputs


def _is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int))


def _id_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def load_workflow(path: str) -> dict:
    """A workflow file -> API-format prompt (UI-format files are converted)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return ui_to_api(data) if "nodes" in data and "links" in data else data
