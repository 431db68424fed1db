"""The demo, the product's main job (`python demo.py`; nodes/demo.py runs the bundled workflows, wegen/demo.py
judges the pictures and texts): it runs on the toy and on another checkpoint, builds the tiny checkpoint only
when asked, and its verdicts on rendered pictures are right."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

EXPECTED = {"wegen_text_to_image", "wegen_reference_guided", "wegen_understand_then_generate", "wegen_reconstruction"}


@pytest.mark.integration
def test_demo_runs_the_bundled_workflows_on_the_toy_and_judges_them(tmp_path):
    from ComfyUI_WeGen.nodes.demo import run_demo

    out = tmp_path / "demo"
    assert run_demo(out_dir=str(out), steps=2) == str(out / "index.html")  # on wegen-toy by default
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "on wegen-toy" in index and "noise by design" not in index
    for name in EXPECTED:
        assert name.replace("_", " ") in index
    shown = re.findall(r'<img src="([^"]+\.png)"', index)
    assert len(shown) >= 8 and all(os.path.isfile(out / src) for src in shown)
    items = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    pictures = [it for it in items if "file" in it]
    judged = [it for it in pictures if "read" in it]
    assert len(judged) == len(pictures) - 1  # all but the contact sheet
    assert all(set(it["read"]) == {"size", "colour", "shape", "position", "background"} for it in judged)
    by_prompt = {it["prompt"]: it for it in judged}
    t2i = by_prompt["a large red circle at the top left on a white background"]
    assert t2i["of"] == 5 and t2i["changed"] is None
    edit = by_prompt["make it yellow"]  # the chat's turn 2: the change + the other four as turn 1 came out
    assert edit["changed"] == "colour" and edit["asked"]["colour"] == "yellow" and edit["of"] >= 1
    recon = next(it for it in judged if it["prompt"] == "reconstruct the picture")
    assert recon["of"] >= 1  # the source's attributes
    texts = {it["caption"]: it for it in items if "text" in it}
    assert {"Answer", "Rewrites"} <= set(texts) and all("valid" in texts[c] for c in ("Answer", "Rewrites"))
    assert "&#10003;" in index or "&#10007;" in index
    assert index.count("asked attributes right") >= len([it for it in judged if it["of"]])


@pytest.mark.integration
def test_demo_on_another_checkpoint(tmp_path, tiny_ckpt):
    from ComfyUI_WeGen.nodes.demo import run_demo

    out = tmp_path / "demo"
    run_demo(tiny_ckpt, str(out), steps=1)
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "on tiny" in index and len(re.findall(r'<img src="([^"]+\.png)"', index)) >= 8


def test_demo_builds_the_tiny_checkpoint_only_when_asked(tmp_path, monkeypatch, capsys):
    from demo import main
    from wegen import demo, tiny
    from wegen.cli import main as wegen_main
    from wegen.loading import BUNDLED_DIR, CheckpointError

    missing = str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="python demo.py --tiny"):
        demo.ensure_checkpoint(missing)
    assert not os.path.exists(missing)
    assert main(["--checkpoint", missing, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--tiny" in err and err.count("\n") == 1
    assert wegen_main(["demo", "--tiny"]) == 2  # the engine's CLI cannot run the nodes: it points to demo.py
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "`python demo.py " in err and err.count("\n") == 1
    built = []
    monkeypatch.setattr(tiny, "make_tiny", lambda folder, seed=0: built.append(folder) or folder)
    assert demo.ensure_checkpoint(missing, make_tiny=True) == missing and built == [missing]
    assert demo.ensure_checkpoint("wegen-toy") == os.path.join(BUNDLED_DIR, "wegen-toy")


def _png(tmp_path, picture, name="p.png"):
    from wegen.images import save_png

    path = str(tmp_path / name)
    save_png(torch.from_numpy(picture).float() / 255.0, path)
    return path


def test_demo_verdicts_on_rendered_pictures(tmp_path):
    from wegen import toyworld as W
    from wegen.demo import asked_attributes, judge_picture, judge_text

    scene = W.Scene("large", "red", "circle", "top left", "white")
    path = _png(tmp_path, W.render(scene))
    full = judge_picture(path, W.describe(scene), None, "prompt")
    assert full["marks"] == dict.fromkeys(W.ATTRIBUTES, True) and (full["right"], full["of"]) == (5, 5)
    partial = judge_picture(path, "a blue circle", None, "prompt")
    assert partial["marks"] == {"colour": False, "shape": True} and partial["asked"] == {"colour": "blue",
                                                                                         "shape": "circle"}
    before = W.read(W.render(W.Scene("large", "red", "circle", "center", "white")))
    moved = judge_picture(path, "move it to the top left", before, "prompt")
    assert moved["changed"] == "position" and moved["right"] == moved["of"] == 5
    wrong = judge_picture(path, "make it green", before, "prompt")
    assert wrong["marks"]["colour"] is False and wrong["marks"]["position"] is False and wrong["right"] == 3
    assert asked_attributes("a cat on a mat", None) == ({}, None)
    assert asked_attributes("make it a square", None) == ({"shape": "square"}, "shape")
    recon = judge_picture(path, "reconstruct the picture", W.read(W.render(scene)), "reconstruct")
    assert recon["right"] == 5
    answer = judge_text(W.describe(scene), W.read(W.render(scene)), "answer")
    assert answer["valid"] and answer["right"] == answer["of"] == 5
    rewrite = judge_text("a small red square at the top on a gray background", {"colour": "red"}, "rewrite")
    assert rewrite["valid"] and rewrite["marks"] == {"colour": True}
    assert judge_text("a red square", {"colour": "red"}, "rewrite")["valid"] is False  # partial: not a rewrite
    assert judge_text("xyzzy", {"colour": "red"}, "rewrite")["parsed"] is None
