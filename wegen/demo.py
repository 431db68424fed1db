"""The demo's engine side: the checkpoint it runs on, the verdicts and the page (index.html).

The demo itself is `python demo.py` at the pack root: it runs the bundled workflows headless through the node
classes (nodes/demo.py; the engine never imports the nodes) and hands what the output nodes showed to this module.
Every picture on the page is judged by the shapes world's reader (wegen.toyworld.read): the five attributes it
reads, and for pictures asked for with a description or an edit, which asked attributes came out right (an edit
asks for the changed attribute and for the other four as they were read on the picture it edits). Text outputs
(the understanding answer, the rewrites) are checked as descriptions in the world's words.
"""
from __future__ import annotations

import html
import os

DEFAULT_CHECKPOINT = "wegen-toy"  # bundled: checkpoints/wegen-toy
DEMO_COMMAND = "python demo.py"  # at the pack root (wegen/ cannot run the nodes)


def ensure_checkpoint(checkpoint: str, make_tiny: bool = False) -> str:
    """A checkpoint folder, its parent or a bundled name -> its folder. A missing folder is an error, unless
    make_tiny asks for the tiny random-weight checkpoint to be built there."""
    from .loading import CheckpointError, resolve_checkpoint
    from .tiny import make_tiny as build_tiny

    try:
        return resolve_checkpoint(checkpoint)[1]
    except CheckpointError as e:
        if not make_tiny:
            raise CheckpointError(f"{e}; `{DEMO_COMMAND} --tiny --checkpoint {checkpoint}` builds a tiny "
                                  f"random-weight checkpoint there") from None
        if os.path.exists(checkpoint) and os.listdir(checkpoint):
            raise
        build_tiny(checkpoint, seed=0)
    return os.path.abspath(checkpoint)


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
