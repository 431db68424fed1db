"""`python -m wegen demo`: the bundled workflows, run headless through the node classes on the bundled
wegen-toy checkpoint (a small WeGen trained on the shapes world) -> PNGs + index.html in output/demo/.

Every picture on the page is judged by the shapes world's reader (wegen.toyworld.read): the five attributes it
reads, and for pictures asked for with a description or an edit, which asked attributes came out right (an edit
asks for the changed attribute and for the other four as they were read on the picture it edits). Text outputs
(the understanding answer, the rewrites) are checked as descriptions in the world's words.
`--checkpoint` runs the same workflows on another checkpoint; `--tiny` builds the tiny random-weight checkpoint
(official layout, pictures are noise) where it is missing, for runs without the bundled one.
"""
from __future__ import annotations

import glob
import html
import json
import os

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS_DIR = os.path.join(PACK_ROOT, "workflows")  # the UI-format workflows artists load in ComfyUI
DEFAULT_CHECKPOINT = "wegen-toy"  # bundled: checkpoints/wegen-toy


def ensure_checkpoint(checkpoint: str, make_tiny: bool = False) -> str:
    """A checkpoint folder, its parent or a bundled name -> its folder. A missing folder is an error, unless
    make_tiny asks for the tiny random-weight checkpoint to be built there."""
    from .loading import CheckpointError, resolve_checkpoint
    from .tiny import make_tiny as build_tiny

    try:
        return resolve_checkpoint(checkpoint)[1]
    except CheckpointError as e:
        if not make_tiny:
            raise CheckpointError(f"{e}; `python -m wegen demo --tiny --checkpoint {checkpoint}` builds a tiny "
                                  f"random-weight checkpoint there") from None
        if os.path.exists(checkpoint) and os.listdir(checkpoint):
            raise
        build_tiny(checkpoint, seed=0)
    return os.path.abspath(checkpoint)


def run_demo(checkpoint: str = DEFAULT_CHECKPOINT, out_dir: str = os.path.join("output", "demo"),
             steps: int | None = None, make_tiny: bool = False) -> str:
    """Every workflow in workflows/, on `checkpoint` (steps overrides each node's steps) -> out_dir/index.html."""
    # The demo is the product's main job, so it drives the graph layer: nodes.headless executes the bundled
    # workflows through the same node classes ComfyUI runs (imported here: the engine never needs them).
    from nodes import headless

    from .images import check_writable

    check_writable(out_dir, is_dir=True)
    folder = ensure_checkpoint(checkpoint, make_tiny)
    items = []
    for path in sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        prompt = headless.load_workflow(path)
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
    return write_index(out_dir, f"WeGen demo: the bundled workflows on {label}", items, make_tiny)


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
                item.update(judge_picture(os.path.join(out_dir, image["subfolder"], image["filename"]), *ask))
            items.append(item)
        texts = shown.get("text", [])
        checks = _text_checks(prompt, run, node_id, len(texts)) if texts else []
        for text, check in zip(texts, checks):
            if check is None and not text.strip():
                continue  # an empty reply (force_image starts the picture right away): nothing to show
            item = {"text": text, "caption": prompt[node_id]["_meta"]["title"]}
            if check is not None:
                item.update(judge_text(text, *check))
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
    from . import toyworld

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
    from . import toyworld

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


def asked_attributes(text: str, before: dict | None) -> tuple[dict, str | None]:
    """What a prompt asks of a picture: ({attribute: value}, the changed attribute of an edit or None).

    A (partial) description asks for the attributes it names; an edit asks for its one change and, when the
    picture it edits was read, for the other four as they were; anything else asks nothing."""
    from . import toyworld

    attrs = toyworld.parse_description(str(text or ""))
    if attrs is not None:
        return {a: v for a, v in attrs.items() if v}, None
    edit = toyworld.parse_edit(str(text or ""))
    if edit is None:
        return {}, None
    attribute, value = edit
    kept = {a: v for a, v in (before or {}).items() if v and a != attribute}
    return {**kept, attribute: value}, attribute


def judge_picture(path: str, text: str, before: dict | None, kind: str) -> dict:
    """The reader's verdict on a saved picture: read attributes, asked attributes, right/wrong per asked one."""
    from . import toyworld
    from .images import load_image

    read = toyworld.read(load_image(path)[0].numpy())
    if kind == "reconstruct":
        asked, changed = {a: v for a, v in (before or {}).items() if v}, None
    else:
        asked, changed = asked_attributes(text, before)
    marks = toyworld.matches(read, asked)
    return {"prompt": text, "read": read, "asked": asked, "changed": changed, "marks": marks,
            "right": sum(marks.values()), "of": len(marks)}


def judge_text(text: str, wanted: dict | None, kind: str) -> dict:
    """A text output checked as a description: does it parse (a full description for answers and rewrites), and
    does it state what it must (an answer: what the reader reads on the picture; a rewrite: what was given)."""
    from . import toyworld

    parsed = toyworld.parse_description(text)
    asked = {a: v for a, v in (wanted or {}).items() if v}
    marks = toyworld.matches(parsed or {}, asked)
    return {"parsed": parsed, "valid": toyworld.is_full(parsed), "asked": asked, "marks": marks,
            "right": sum(marks.values()), "of": len(marks), "kind": kind}


# The page -------------------------------------------------------------------------------------------

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}figure{display:inline-block;margin:1em;"
         "vertical-align:top;width:260px}img{image-rendering:pixelated;border:1px solid #ccc}"
         "figcaption{font-size:90%}q{font-style:italic}.ok{color:#080}.bad{color:#c00}.changed{font-weight:bold}"
         "ul.attrs{list-style:none;padding:0;margin:.3em 0}pre{white-space:pre-wrap;background:#f4f4f4;"
         "padding:.5em}.summary{font-size:110%}")


def write_index(out_dir: str, title: str, items: list[dict], random_weights: bool = False) -> str:
    """index.html: per item a heading {heading}, a link {link, caption}, a picture {file, caption} (path relative
    to out_dir) or a text {text, caption}; pictures and texts with a verdict (judge_picture / judge_text) show it."""
    figures = "\n".join(_figure(it) for it in items)
    pictures = [it for it in items if "file" in it and it.get("of")]
    texts = [it for it in items if "text" in it and "valid" in it]
    summary = (f"<p class='summary'>Pictures with every asked attribute right: "
               f"<b>{sum(it['right'] == it['of'] for it in pictures)} of {len(pictures)}</b> "
               f"({sum(it['right'] for it in pictures)} of {sum(it['of'] for it in pictures)} asked attributes). "
               f"Texts that are full descriptions stating what they must: "
               f"<b>{sum(it['valid'] and it['right'] == it['of'] for it in texts)} of {len(texts)}</b>.</p>")
    about = ("<p>Each picture is read by the shapes world's rules (<code>wegen.toyworld.read</code>: background, "
             "colour, position, size and shape from the pixels). <span class='ok'>&#10003;</span> = an asked "
             "attribute read as asked, <span class='bad'>&#10007;</span> = read otherwise; an edit asks for its "
             "change (in bold) and for the other four as read on the picture it edits; a reconstruction asks for "
             "the source's five. Texts are checked as descriptions in the world's words.</p>")
    if random_weights:
        about += ("<p>This run used the tiny random-weight checkpoint: its pictures and texts are noise by design "
                  "(it proves the machinery only); the bundled wegen-toy makes real ones.</p>")
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"<h1>{html.escape(title)}</h1>{summary}{about}\n{figures}\n")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def _figure(item: dict) -> str:
    if "heading" in item:
        return f"<h2>{html.escape(item['heading'])}</h2>"
    if "link" in item:
        return f"<p><a href=\"{html.escape(item['link'])}\">{html.escape(item['caption'])}</a></p>"
    caption = f"<b>{html.escape(item['caption'])}</b>"
    if "text" in item:
        return (f"<figure><pre>{html.escape(item['text'] or '(empty reply)')}</pre><figcaption>{caption}"
                f"{_text_verdict(item)}</figcaption></figure>")
    src = html.escape(item["file"])
    verdict = _picture_verdict(item) if "read" in item else ""
    return (f'<figure><a href="{src}"><img src="{src}" width="256"></a><figcaption>{caption}{verdict}'
            f'</figcaption></figure>')


def _mark(ok: bool) -> str:
    return "<span class='ok'>&#10003;</span>" if ok else "<span class='bad'>&#10007;</span>"


def _picture_verdict(item: dict) -> str:
    from .toyworld import ATTRIBUTES

    rows = []
    for a in ATTRIBUTES:
        value = item["read"].get(a) or "none"
        cls = " class='changed'" if a == item.get("changed") else ""
        if a in item["marks"]:
            wanted = "" if item["marks"][a] else f" (asked: {html.escape(item['asked'][a])})"
            rows.append(f"<li{cls}>{_mark(item['marks'][a])} {a}: {html.escape(value)}{wanted}</li>")
        else:
            rows.append(f"<li>&middot; {a}: {html.escape(value)}</li>")
    score = (f"{_mark(item['right'] == item['of'])} {item['right']} of {item['of']} asked attributes right"
             if item["of"] else "nothing asked: what the reader sees")
    return f"<br><q>{html.escape(str(item['prompt']))}</q><br>{score}<ul class='attrs'>{''.join(rows)}</ul>"


def _text_verdict(item: dict) -> str:
    if "valid" not in item:
        return ""
    if item["parsed"] is None:
        return f"<br>{_mark(False)} not a description in the world's words"
    head = (f"{_mark(True)} a full description" if item["valid"]
            else f"{_mark(False)} a partial description (a full one was expected)")
    what = "what the reader reads on the picture" if item["kind"] == "answer" else "what the prompt gave"
    if not item["of"]:
        return f"<br>{head}"
    rows = "".join(f"<li>{_mark(ok)} {a}: {html.escape(str(item['parsed'].get(a) or 'left out'))}"
                   f"{'' if ok else ' (expected: ' + html.escape(item['asked'][a]) + ')'}</li>"
                   for a, ok in item["marks"].items())
    return f"<br>{head}; {item['right']} of {item['of']} as {what}<ul class='attrs'>{rows}</ul>"


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
