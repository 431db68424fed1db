"""Workflow files: loading, and UI format -> API format as ComfyUI's frontend converts a graph (stdlib only).

The one converter of the project: the headless runner (nodes/headless.py, the demo), the `queue` command and the
tests all use it. It never imports ComfyUI or torch, and it knows no node class: which inputs are widgets, and
how many widgets_values slots each takes, comes from node definitions in ComfyUI's /object_info form, either a
server's own /object_info (`queue`) or object_info(NODE_CLASS_MAPPINGS), built from the classes' INPUT_TYPES the
way ComfyUI's server builds it.

What the editor saves (UI format: nodes + links + positional widgets_values) becomes what it queues (API format:
{id: {class_type, inputs, _meta}}) by the frontend's graph-to-prompt rules:
  * widget values are matched to the class's widget inputs in input_order (required, then optional); the extra
    value the editor saves after a control_after_generate widget (INT inputs named seed / noise_seed get one unless
    their spec says False; it holds fixed/increment/decrement/randomize) and after an upload combo is skipped, and so
    are the widgets the frontend adds on its own (FRONTEND_WIDGETS: PreviewAny's preview);
  * links become [source id, slot]; Reroute nodes are followed through; a PrimitiveNode's value is written into
    the widget inputs it feeds; Note / MarkdownNote are dropped;
  * muted nodes (mode 2) are dropped, and so are inputs linked to them; bypassed nodes (mode 4) are dropped and
    pass through: what reads one of their outputs reads their input of the same type (the input at the same slot
    first, then the first of that type), or nothing when there is none;
  * seeds are sent as saved: "randomize" only acts in the editor. Subgraphs are refused.
strict=True also checks what the editor would silently repair or shift: one widgets_values slot per widget, and
every link joining an output and an input of its type (the headless runner and the tests use it on workflows/).
"""
from __future__ import annotations

import json
import os

MODE_MUTED, MODE_BYPASS = 2, 4
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # editor-side nodes, never sent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SEED_NAMES = ("seed", "noise_seed")  # the editor adds control_after_generate to these INT inputs by default
FRONTEND_WIDGETS = {"PreviewAny": ("preview", "preview", "previewMode")}  # added by the frontend, never queued


def load_workflow(path: str) -> tuple[dict, str]:
    """A workflow file -> (its JSON, "ui" | "api")."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"workflow not found: {os.path.abspath(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            wf = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read workflow {path}: {e}") from e
    if isinstance(wf, dict) and isinstance(wf.get("nodes"), list):
        return wf, "ui"
    if isinstance(wf, dict) and wf and all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
        return wf, "api"
    raise ValueError(f"{path} is neither a UI-format workflow (with 'nodes' and 'links') nor an API-format "
                     f"prompt ({{id: {{class_type, inputs}}}})")


def object_info(mappings: dict) -> dict:
    """{node id: class with INPUT_TYPES / RETURN_TYPES} -> /object_info entries, as ComfyUI's server makes them."""
    info = {}
    for name, cls in mappings.items():
        inputs = cls.INPUT_TYPES()
        info[name] = {"input": inputs, "input_order": {section: list(specs) for section, specs in inputs.items()},
                      "output": list(cls.RETURN_TYPES), "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
                      "display_name": getattr(cls, "TITLE", None) or name}
        if getattr(cls, "APPENDED_WIDGETS", ()):  # not ComfyUI's: widgets a workflow saved before them lacks
            info[name]["appended_widgets"] = list(cls.APPENDED_WIDGETS)
    return info


# Widgets ---------------------------------------------------------------------------------------------

def _options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _kind(spec) -> str:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(kind, (list, tuple)) else kind


def input_types(info: dict) -> dict:
    """{input name: type} of every required and optional input ("COMBO" for a list of choices)."""
    inputs = info.get("input") or {}
    return {name: _kind(spec) for section in ("required", "optional")
            for name, spec in (inputs.get(section) or {}).items()}


def widgets(info: dict) -> list[tuple[str, bool, bool]]:
    """(name, followed by a control_after_generate value, has an upload button) of each widget input of a node
    definition, in the order of its widgets_values: input_order required, then optional."""
    inputs, order = info.get("input") or {}, info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or list(specs):
            spec = specs.get(name)
            kind, options = _kind(spec), _options(spec)
            if spec is None or kind not in WIDGET_TYPES or options.get("forceInput"):
                continue
            control = bool(options.get("control_after_generate", kind == "INT" and name in SEED_NAMES))
            upload = any(key.endswith("_upload") and value for key, value in options.items())
            out.append((name, control, upload))
    return out


def widget_default(info: dict, name: str):
    """The value the editor gives a widget that a saved workflow has no value for: its declared default, else the
    first choice of a combo, 0 for a number, False for a toggle, "" for text."""
    inputs = info.get("input") or {}
    spec = {**(inputs.get("required") or {}), **(inputs.get("optional") or {})}[name]
    options, kind = _options(spec), _kind(spec)
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], (list, tuple)) else options.get("options") or [None]
        return choices[0]
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(kind, "")


def widget_values(node: dict, info: dict, strict: bool = False) -> dict:
    """A UI node's widgets_values (positional, or a dict) -> {widget input name: value}."""
    names = widgets(info)
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        return {name: values[name] for name, _, _ in names if name in values}
    if strict:
        expected = len(names) + sum(control for _, control, _ in names) + len(FRONTEND_WIDGETS.get(node["type"], ()))
        appended, tail = set(info.get("appended_widgets") or ()), 0
        while tail < len(names) and names[-1 - tail][0] in appended and not names[-1 - tail][1]:
            tail += 1  # trailing widgets added later keep their defaults, as in the editor
        if not expected - tail <= len(values) <= expected + sum(upload for _, _, upload in names):
            slots = ", ".join(name + (" + control" if control else "") for name, control, _ in names)
            raise ValueError(f"node {node['id']} ({node['type']}): widgets_values has {len(values)} values but the "
                             f"node has {expected} widget slots ({slots})")
    out, i = {}, 0
    for j, (name, control, upload) in enumerate(names):
        if i >= len(values):  # a workflow saved before these widgets existed: the editor gives them their defaults
            out.update((rest, widget_default(info, rest)) for rest, _, _ in names[j:])
            break
        out[name] = values[i]
        i += 1
        remaining = len(names) - j - 1
        if i < len(values) and ((control and values[i] in CONTROL_VALUES) or (upload and len(values) - i > remaining)):
            i += 1  # the editor's extra widget: control_after_generate or the upload button
    return out


# UI -> API -------------------------------------------------------------------------------------------

def _links(ui: dict) -> dict:
    """link id -> (origin id, origin slot, target id, type), from list links [id, from, slot, to, slot, type] or
    dict links."""
    out = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("target_id"), link.get("type"))
        else:
            out[link[0]] = (link[1], link[2], link[3], link[5] if len(link) > 5 else None)
    return out


def ui_to_api(ui: dict, info: dict, *, strict: bool = False) -> dict:
    """UI-format workflow + node definitions ({type: /object_info entry}) -> the API-format prompt it queues."""
    if (ui.get("definitions") or {}).get("subgraphs"):
        raise ValueError("this workflow uses subgraphs, which cannot be converted here; export it with "
                         "'Export (API)' in ComfyUI and use that file")
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = _links(ui)
    api = {}
    for nid in sorted(nodes, key=_sort_key):
        node = nodes[nid]
        kind = node.get("type")
        if kind in VIRTUAL_NODES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        if kind not in info:
            raise ValueError(f"node {nid} is of type {kind!r}, an unknown node type (not among the {len(info)} node "
                             f"definitions given, e.g. the server's /object_info); install the node pack that has it "
                             f"or remove the node")
        inputs = widget_values(node, info[kind], strict)
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            if strict:
                _check_link(nodes, links, info, node, inp)
            source = _source(nodes, links, inp["link"], set())
            if source is None:
                inputs.pop(name, None)
            elif isinstance(source, tuple):  # a PrimitiveNode's value
                inputs[name] = source[1]
            else:
                inputs[name] = source
        title = node.get("title") or info[kind].get("display_name") or kind
        api[str(nid)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    for entry in api.values():  # what reads from a node that is not sent reads nothing (as the frontend does)
        entry["inputs"] = {k: v for k, v in entry["inputs"].items() if not (_is_link(v) and str(v[0]) not in api)}
    if not api:
        raise ValueError("the workflow has no node to run")
    return api


def _source(nodes: dict, links: dict, link_id, seen: set):
    """Where a link really comes from: [id, slot], ("value", v) for a PrimitiveNode, None for nothing."""
    if link_id not in links or link_id in seen:
        return None
    seen.add(link_id)
    origin, slot, _, kind = links[link_id]
    node = nodes.get(origin)
    if node is None or node.get("mode", 0) == MODE_MUTED:
        return None
    if node.get("type") == "Reroute":
        ins = node.get("inputs") or []
        return _source(nodes, links, ins[0].get("link"), seen) if ins else None
    if node.get("type") == "PrimitiveNode":
        return ("value", (node.get("widgets_values") or [None])[0])
    if node.get("type") in VIRTUAL_NODES:
        return None
    if node.get("mode", 0) == MODE_BYPASS:  # pass the input of the same type through (same slot first)
        outs, ins = node.get("outputs") or [], node.get("inputs") or []
        kind = kind or (outs[slot].get("type") if slot < len(outs) else None)
        for i in ([slot] if slot < len(ins) else []) + list(range(len(ins))):
            if ins[i].get("type") == kind:
                return _source(nodes, links, ins[i].get("link"), seen)
        return None
    return [str(origin), slot]


def _check_link(nodes: dict, links: dict, info: dict, node: dict, inp: dict) -> None:
    """strict: the link exists, ends here, and joins an output and an input of its type."""
    where = f"node {node['id']} ({node['type']})"
    if inp["link"] not in links:
        raise ValueError(f"{where}: input {inp.get('name')!r} names link {inp['link']}, which is not in 'links'")
    origin, slot, target, kind = links[inp["link"]]
    if target is not None and target != node["id"]:
        raise ValueError(f"{where}: link {inp['link']} ends at node {target}, not here")
    source = nodes.get(origin)
    if source is None:
        raise ValueError(f"{where}: link {inp['link']} comes from node {origin}, which is not in the workflow")
    if source.get("type") not in VIRTUAL_NODES and source.get("type") in info:
        outputs = info[source["type"]].get("output") or []
        if slot >= len(outputs) or outputs[slot] != kind:
            raise ValueError(f"{where}: link from node {origin} slot {slot} is typed {kind!r} but that output is "
                             f"{outputs[slot] if slot < len(outputs) else 'missing'}")
    declared = input_types(info[node["type"]])
    name = (inp.get("widget") or {}).get("name") or inp.get("name")
    if name not in declared:
        raise ValueError(f"{where}: no input named {name!r}")
    if declared[name] not in (kind, "*"):
        raise ValueError(f"{where}: input {name!r} takes {declared[name]} but is linked to a {kind}")


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _sort_key(nid):
    return (0, int(nid), "") if str(nid).isdigit() else (1, 0, str(nid))
