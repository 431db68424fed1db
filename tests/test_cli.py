"""`python -m wegen`: success paths write real files; every bad input exits 2 with a one-line message."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from wegen import loading
from wegen.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "ref.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return str(path)


def test_generate_understand_reconstruct_convert(capsys, tiny_ckpt, tmp_path, image_file):
    out = tmp_path / "gen" / "a.png"
    code, stdout, _ = run(capsys, "generate", "--checkpoint", tiny_ckpt, "--prompt", "a fox", "--steps", "2",
                          "--size", "64x48", "--out", str(out), "--image", image_file)
    assert code == 0 and json.loads(stdout)["out"] == str(out)
    with Image.open(out) as im:
        assert im.size == (64, 48) and im.info["prompt"] == "a fox"
    code, stdout, _ = run(capsys, "understand", "--checkpoint", tiny_ckpt, "--image", image_file, "what is this?",
                          "--max-new-tokens", "4")
    assert code == 0
    rec = tmp_path / "rec.png"
    code, _, _ = run(capsys, "reconstruct", "--checkpoint", tiny_ckpt, "--image", image_file, "--steps", "1",
                     "--size", "64", "--out", str(rec))
    assert code == 0 and Image.open(rec).size == (64, 64)
    code, stdout, _ = run(capsys, "convert", tiny_ckpt, str(tmp_path / "conv"))
    assert code == 0 and os.path.isfile(tmp_path / "conv" / loading.CONVERTED_CONFIG)


def _generate(capsys, ckpt, out, *extra):
    return run(capsys, "generate", "--checkpoint", ckpt, "--prompt", "x", "--steps", "1", "--size", "64",
               "--out", str(out), *extra)


@pytest.mark.parametrize("extra, message", [
    (["--size", "100x64"], "width must be a positive multiple of 8 up to 4096"),
    (["--size", "0x64"], "width must be a positive multiple of 8"),
    (["--size", "64x8192"], "height must be a positive multiple of 8 up to 4096"),
    (["--size", "big"], "--size must be WIDTHxHEIGHT"),
    (["--steps", "0"], "steps must be an integer in 1..1000"),
    (["--steps", "1001"], "steps must be an integer in 1..1000"),
    (["--cfg", "-1"], "cfg (guidance_scale) must be >= 0"),
    (["--image", "/nonexistent/ref.png"], "image not found"),
])
def test_bad_generation_inputs_exit_2(capsys, tiny_ckpt, tmp_path, extra, message):
    code, _, err = _generate(capsys, tiny_ckpt, tmp_path / "o.png", *extra)
    assert code == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_unreadable_image_exit_2(capsys, tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, _, err = _generate(capsys, tiny_ckpt, tmp_path / "o.png", "--image", str(bad))
    assert code == 2 and "cannot read image" in err


@pytest.mark.parametrize("name", ["o.foo", "o"])
def test_output_that_is_not_an_image_format_exit_2_before_any_work(capsys, tiny_ckpt, tmp_path, monkeypatch, name):
    from wegen import engine

    monkeypatch.setattr(engine.WeGenEngine, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = _generate(capsys, tiny_ckpt, tmp_path / name)
    assert code == 2 and "is not an image format this can write; use .png" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_unwritable_output_exit_2(capsys, tiny_ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _generate(capsys, tiny_ckpt, blocker / "sub" / "o.png")
    assert code == 2 and "cannot be written" in err
    code, _, err = _generate(capsys, tiny_ckpt, tmp_path)  # a folder is no PNG path
    assert code == 2 and "cannot be written" in err


def test_missing_and_partial_checkpoints_exit_2(capsys, tiny_ckpt, tmp_path):
    code, _, err = _generate(capsys, str(tmp_path / "nope"), tmp_path / "o.png")
    assert code == 2 and "checkpoint folder not found" in err
    partial = tmp_path / "partial"
    shutil.copytree(tiny_ckpt, partial)
    os.remove(partial / loading.UNET_DIR / loading.UNET_FILE)
    code, _, err = _generate(capsys, str(partial), tmp_path / "o.png")
    assert code == 2 and "diffusion_pytorch_model.bf16.safetensors" in err


def test_truncated_checkpoint_exit_2(capsys, tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    with open(broken / loading.FINAL_FILE, "r+b") as f:
        f.truncate(1000)
    code, _, err = _generate(capsys, str(broken), tmp_path / "o.png")
    assert code == 2 and "truncated or corrupt" in err and loading.FINAL_FILE in err


def test_unknown_command_and_missing_argument_exit_2(capsys):
    assert run(capsys, "paint")[0] == 2
    code, _, err = run(capsys, "generate", "--prompt", "x")
    assert code == 2 and "--checkpoint" in err and err.count("\n") == 1


def test_module_entry_point_exit_codes(tmp_path):
    """The real `python -m wegen` process: exit 2 and one stderr line for a missing checkpoint."""
    proc = subprocess.run([sys.executable, "-m", "wegen", "understand", "--checkpoint", str(tmp_path / "none"),
                           "--image", "x.png", "hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
