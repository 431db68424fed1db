"""The demo (the README's main command, `python demo.py`): the bundled workflows, run headless through the node
classes on the bundled wegen-toy checkpoint (a small WeGen trained on the shapes world) -> PNGs + index.html.

This is the workflow side of the demo, next to the headless runner it drives (the engine never imports the nodes):
it runs every workflow in workflows/ and turns what the output nodes showed into page items. The verdicts (the
shapes world's reader on every picture and text) and the page itself are engine-side, in wegen/demo.py.
`--checkpoint` runs the same workflows on another checkpoint; `--tiny` builds the tiny random-weight checkpoint
(official layout, pictures are noise) where it is missing, for runs without the bundled one.
"""
from __future__ import annotations

import glob
import json
import os

from ..wegen import demo as page
from . import headless
from .host import PACK_ROOT

WORKFLOWS_DIR = os.path.join(PACK_ROOT, "workflows")  # the UI-format workflows artists load in ComfyUI
DEFAULT_CHECKPOINT = page.DEFAULT_CHECKPOINT


def run_demo(checkpoint: str = DEFAULT_CHECKPOINT, out_dir: str = os.path.join("output", "demo"),
             steps: int | None = None, make_tiny: bool = False) -> str:
    """Every workflow in workflows/, on `checkpoint` (steps overrides each node's steps) -> out_dir/index.html."""
    from ..wegen.images import check_writable

    check_writable(out_dir, is_dir=True)
    folder = page.ensure_checkpoint(checkpoint, make_tiny)
    items = []
    for path in sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        prompt = headless.load_workflow(path)  # UI format, converted against the node classes
        for node in prompt.values():
            if node["class_type"] == "WeGenLoader":
                node["inputs"]["checkpoint"] = folder
            if steps is not None and "steps" in node["inputs"]:
                node["inputs"]["steps"] = steps
        run = headless.run(prompt, out_dir)  # sets the output folder: chat sessions land in out_dir/wegen/sessions/
        items.append({"heading": name.replace("_", " ")})
        items += _run_items(prompt, run, out_dir)
        items += [it for it in _chat_items(prompt, out_dir) if "link" in it]  # the pictures are on the page already
    with open(os.path.join(out_dir, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(items, f, indent=1)
    label = os.path.basename(os.path.normpath(checkpoint))
    return page.write_index(out_dir, f"WeGen demo: the bundled workflows on {label}", items, make_tiny)


# What the run showed, judged ------------------------------------------------------------------------

def _run_items(prompt: dict, run, out_dir: str) -> list[dict]:
    """Index items for what a run's output nodes showed: saved pictures and previewed texts, each with a verdict."""
    items = []
    for node_id, shown in sorted(run.ui.items(), key=lambda kv: _shown_order(prompt, run, kv[0])):
        node = prompt[node_id]
        links = [v for v in node["inputs"].values() if _is_link(v)]  # the images / source
        title = node["_meta"]["title"]  # a title of its own, else the title of what it shows
        if links and title == node["class_type"]:
            title = prompt[str(links[0][0])]["_meta"]["title"]
        images = shown.get("images", [])
        asks = _picture_asks(prompt, run, node_id, len(images)) if images else []
        for image, ask in zip(images, asks):
            item = {"file": "/".join(p for p in (image["subfolder"], image["filename"]) if p), "caption": title}
            if ask is not None:
                item.update(page.judge_picture(os.path.join(out_dir, image["subfolder"], image["filename"]), *ask))
            items.append(item)
        texts = shown.get("text", [])
        checks = _text_checks(prompt, run, node_id, len(texts)) if texts else []
        for text, check in zip(texts, checks):
            if check is None and not text.strip():
                continue  # an empty reply (force_image starts the picture right away): nothing to show
            item = {"text": text, "caption": prompt[node_id]["_meta"]["title"]}
            if check is not None:
                item.update(page.judge_text(text, *check))
            items.append(item)
    return items


def _shown_order(prompt: dict, run, node_id: str) -> int:
    """Where what an output node shows was made, in execution order (a source picture before its answer)."""
    done = list(run.outputs)  # filled in execution order
    links = [str(v[0]) for v in prompt[node_id]["inputs"].values() if _is_link(v)]
    return done.index(links[0]) if links and links[0] in done else done.index(node_id)


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _linked(prompt: dict, node_id: str, name: str):
    """(source node id, slot) of a linked input, else None."""
    value = prompt[node_id]["inputs"].get(name)
    return (str(value[0]), value[1]) if _is_link(value) else None


def _value(prompt: dict, run, node_id: str, name: str):
    """An input's value as the node got it (the first item of a linked list)."""
    link = _linked(prompt, node_id, name)
    if link is None:
        return prompt[node_id]["inputs"].get(name)
    values = run.outputs.get(link[0], [[]] * (link[1] + 1))[link[1]]
    return values[0] if values else None


def _read_tensor(images) -> dict | None:
    """The reader's attributes of the first picture of an IMAGE batch (None when there is none)."""
    from ..wegen import toyworld

    if images is None:
        return None
    return toyworld.read(images[0].detach().float().cpu().numpy())


def _picture_asks(prompt: dict, run, node_id: str, n: int) -> list:
    """Per picture a saving node showed: (what was asked in words, the attributes of the picture it starts from or
    None, kind) for judge_picture, or None where nothing was asked (a contact sheet, an unknown source)."""
    link = _linked(prompt, node_id, "images")
    if link is None:
        return [None] * n
    src, slot = link
    kind = prompt[src]["class_type"]
    if kind == "WeGenConsistencyDecode" and slot == 0:
        encode = _linked(prompt, src, "cond")
        if encode is None or prompt[encode[0]]["class_type"] != "WeGenMLLMEncode":
            return [None] * n
        text = _value(prompt, run, encode[0], "text")
        return [(text, _read_tensor(_value(prompt, run, encode[0], "images")), "prompt")] * n
    if kind == "WeGenChatTurn" and slot == 0:
        chat = _linked(prompt, src, "chat")
        before = None
        if chat is not None and prompt[chat[0]]["class_type"] == "WeGenChatTurn":
            before = _read_tensor(run.outputs[chat[0]][0][0])  # the previous turn's picture
        images = _value(prompt, run, src, "images")
        if images is not None:
            before = _read_tensor(images)
        return [(_value(prompt, run, src, "message"), before, "prompt")] * n
    if kind == "WeGenReconstruct":
        return [("reconstruct the picture", _read_tensor(_value(prompt, run, src, "images")), "reconstruct")] * n
    if kind == "WeGenDiversitySweep" and slot == 0:
        texts = run.outputs[src][1]  # the prompt of each image, in batch order
        return [(texts[i], None, "prompt") if i < len(texts) else None for i in range(n)]
    return [None] * n


def _text_checks(prompt: dict, run, node_id: str, n: int) -> list:
    """Per text a Preview node showed: (attributes it must state, kind) for judge_text, or None (no check)."""
    from ..wegen import toyworld

    link = _linked(prompt, node_id, "source")
    if link is None:
        return [None] * n
    src = link[0]
    kind = prompt[src]["class_type"]
    if kind == "WeGenUnderstand":
        return [(_read_tensor(_value(prompt, run, src, "images")), "answer")] * n
    if kind == "WeGenPromptSelfRewrite":
        given = toyworld.parse_description(str(_value(prompt, run, src, "prompt") or ""))
        return [(given, "rewrite")] * n
    return [None] * n




def _chat_items(prompt: dict, out_dir: str) -> list[dict]:
    """The chat sessions a workflow's WeGen Chat Memory nodes wrote: a transcript page each + their pictures."""
    from ..wegen import sessions

    root = os.path.join(out_dir, "wegen", "sessions")
    names = sorted({n["inputs"]["session_name"] for n in prompt.values() if n["class_type"] == "WeGenChatMemory"})
    items = []
    for name in names:
        session = sessions.load_session(root, name)
        page = os.path.join(out_dir, "chat.html" if len(names) == 1 else f"chat_{name}.html")
        sessions.write_transcript(session, page, f"WeGen demo: the chat session {name!r}")
        items.append({"link": os.path.basename(page),
                      "caption": f"Transcript of the chat session {name!r} ({len(session.turns)} turns)"})
        for i, turn in enumerate(session.turns, 1):
            for rel in [*turn.user_images, *([turn.mask] if turn.mask else []), turn.image]:
                items.append({"file": os.path.relpath(session.path(rel), out_dir).replace(os.sep, "/"),
                              "caption": f"session file of turn {i}: {rel.rsplit('/', 1)[-1]}"})
    return items
