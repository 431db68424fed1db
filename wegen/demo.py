"""`python -m wegen demo`: the tiny checkpoint (built if missing) -> PNGs + index.html in output/demo/.

The tiny checkpoint has random weights, so its pictures are noise: the demo proves the machinery
end to end. Point --checkpoint at real weights for real pictures.
"""
from __future__ import annotations

import html
import json
import os

DEMO_PROMPTS = ("a red fox in a snowy forest, watercolor",
                "a lighthouse on a cliff at sunset, oil painting",
                "a cozy reading corner with a cat, digital art")


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
    """index.html: one figure per item {file, caption}; paths relative to out_dir."""
    figures = "\n".join(
        f'<figure><a href="{html.escape(it["file"])}"><img src="{html.escape(it["file"])}" width="256"></a>'
        f'<figcaption>{html.escape(it["caption"])}</figcaption></figure>' for it in items)
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em;"
            "vertical-align:top;max-width:260px}img{image-rendering:pixelated;border:1px solid #ccc}</style>"
            f"<h1>{html.escape(title)}</h1><p>Tiny random-weight checkpoint: the pictures are noise by design; "
            f"real weights make real pictures.</p>\n{figures}\n")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def run_demo(checkpoint: str, out_dir: str, steps: int = 20) -> str:
    from .engine import WeGenEngine
    from .images import check_writable, save_png

    check_writable(out_dir, is_dir=True)
    engine = WeGenEngine.load(ensure_checkpoint(checkpoint))
    items = []
    for i, prompt in enumerate(DEMO_PROMPTS):
        images, cond = engine.generate(prompt, seed=42 + i, steps=steps)
        name = f"generate_{i}.png"
        save_png(images[0], os.path.join(out_dir, name), {"prompt": prompt, "seed": 42 + i})
        items.append({"file": name, "caption": f"{prompt} (seed {42 + i})"})
    with open(os.path.join(out_dir, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(items, f, indent=1)
    return write_index(out_dir, "WeGen demo", items)
