"""Headless graph runner: executes an API-format workflow through NODE_CLASS_MAPPINGS without ComfyUI
(UI-format files are converted by wegen/workflow.py, strictly, against the node classes' own INPUT_TYPES).

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

from ..wegen import workflow
from . import host


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
        from ..wegen.images import save_png

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
            save_png(image, os.path.join(folder, filename))
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
    frontend_only = workflow.FRONTEND_WIDGETS.get(node["class_type"], ())  # the frontend's own; ComfyUI ignores them
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


def load_workflow(path: str, mappings: dict | None = None) -> dict:
    """A workflow file -> API-format prompt (UI-format files are converted, strictly, against `mappings`)."""
    wf, kind = workflow.load_workflow(path)
    return ui_to_api(wf, mappings) if kind == "ui" else wf


def ui_to_api(ui: dict, mappings: dict | None = None) -> dict:
    """A UI-format workflow -> its API prompt; strict: widget slot counts and link types checked against the
    classes' INPUT_TYPES / RETURN_TYPES."""
    return workflow.ui_to_api(ui, workflow.object_info(mappings or node_mappings()), strict=True)
