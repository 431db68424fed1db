"""`python -m wegen demo`: the tiny checkpoint (built if missing) -> the bundled workflows, run headless
through the node classes -> PNGs + index.html in output/demo/.

The tiny checkpoint has random weights, so its pictures are noise: the demo proves the machinery
end to end. Point --checkpoint at real weights for real pictures.
"""
from __future__ import annotations

import glob
import html
import json
import os

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS_DIR = os.path.join(PACK_ROOT, "workflows")  # the UI-format workflows artists load in ComfyUI


def ensure_checkpoint(checkpoint: str) -> str:
    from .loading import CheckpointError, resolve_checkpoint
    from .tiny import make_tiny

    try:
        resolve_checkpoint(checkpoint)
    except CheckpointError:
        if os.path.exists(checkpoint) and os.listdir(checkpoint):
            raise
        make_tiny(checkpoint, seed=0)
    return checkpoint


def write_index(out_dir: str, title: str, items: list[dict]) -> str:
    """index.html: per item a heading {heading}, a picture {file, caption} (path relative to out_dir) or a
    text {text, caption}."""
    figures = "\n".join(_figure(it) for it in items)
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em;"
            "vertical-align:top;max-width:260px}img{image-rendering:pixelated;border:1px solid #ccc}</style>"
            f"<h1>{html.escape(title)}</h1><p>Tiny random-weight checkpoint: the pictures are noise by design; "
            f"real weights make real pictures.</p>\n{figures}\n")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def _figure(item: dict) -> str:
    if "heading" in item:
        return f"<h2>{html.escape(item['heading'])}</h2>"
    if "link" in item:
        return f"<p><a href=\"{html.escape(item['link'])}\">{html.escape(item['caption'])}</a></p>"
    caption = f"<figcaption>{html.escape(item['caption'])}</figcaption>"
    if "text" in item:
        return f"<figure><pre>{html.escape(item['text'] or '(empty reply)')}</pre>{caption}</figure>"
    src = html.escape(item["file"])
    return f'<figure><a href="{src}"><img src="{src}" width="256"></a>{caption}</figure>'


def run_demo(checkpoint: str, out_dir: str, steps: int | None = None) -> str:
    """Every workflow in workflows/, on `checkpoint` (steps overrides each node's steps) -> out_dir/index.html."""
    # The demo is the product's main job, so it drives the graph layer: nodes.headless executes the bundled
    # workflows through the same node classes ComfyUI runs (imported here: the engine never needs them).
    from nodes import headless

    from .images import check_writable

    check_writable(out_dir, is_dir=True)
    checkpoint = os.path.abspath(ensure_checkpoint(checkpoint))
    items = []
    for path in sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        prompt = headless.load_workflow(path)
        for node in prompt.values():
            if node["class_type"] == "WeGenLoader":
                node["inputs"]["checkpoint"] = checkpoint
            if steps is not None and "steps" in node["inputs"]:
                node["inputs"]["steps"] = steps
        run = headless.run(prompt, out_dir)  # sets the output folder: chat sessions land in out_dir/wegen/sessions/
        items.append({"heading": name.replace("_", " ")})
        items += _run_items(prompt, run) + _chat_items(prompt, out_dir)
    with open(os.path.join(out_dir, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(items, f, indent=1)
    return write_index(out_dir, "WeGen demo: the bundled workflows", items)


def _run_items(prompt: dict, run) -> list[dict]:
    """Index items for what a run's output nodes showed: saved pictures and previewed texts."""
    items = []
    for node_id, shown in run.ui.items():
        links = [v for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]  # the images / source
        title = prompt[str(links[0][0])]["_meta"]["title"] if links else prompt[node_id]["_meta"]["title"]
        for image in shown.get("images", []):
            items.append({"file": "/".join(p for p in (image["subfolder"], image["filename"]) if p),
                          "caption": title})
        for text in shown.get("text", []):
            items.append({"text": text, "caption": prompt[node_id]["_meta"]["title"]})
    return items


def _chat_items(prompt: dict, out_dir: str) -> list[dict]:
    """The chat sessions a workflow's WeGen Chat Memory nodes wrote: a transcript page each + their pictures."""
    from . import sessions

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
