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
    (["--seed", "-1"], "--seed must be an integer in 0..2**64-1, got -1"),
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


@pytest.mark.integration
def test_module_entry_point_exit_codes(tmp_path):
    """The real `python -m wegen` process: exit 2 and one stderr line for a missing checkpoint."""
    proc = subprocess.run([sys.executable, "-m", "wegen", "understand", "--checkpoint", str(tmp_path / "none"),
                           "--image", "x.png", "hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


# A checkpoint's recommended settings as the defaults; bundled names (extensions) ---------------------------

@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory):
    return loading.convert(tiny_ckpt, str(tmp_path_factory.mktemp("conv") / "conv"))


@pytest.fixture
def recommending(converted, tmp_path):
    """A converted tiny checkpoint recommending 2 steps, cfg 1.5, 48x32, the aligned feature slice."""
    folder = tmp_path / "rec"
    folder.mkdir()
    for name in os.listdir(converted):
        if name != loading.CONVERTED_CONFIG:
            os.symlink(os.path.join(converted, name), folder / name)
    with open(os.path.join(converted, loading.CONVERTED_CONFIG)) as f:
        config = json.load(f)
    config["recommended"] = {"steps": 2, "cfg": 1.5, "width": 48, "height": 32, "feature_slice": "aligned"}
    with open(folder / loading.CONVERTED_CONFIG, "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.fixture
def spy(monkeypatch):
    """spy(owner, name) -> list of the kwargs of every call (the call still runs)."""

    def install(owner, name):
        calls, original = [], getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
        return calls

    return install


def test_unknown_checkpoint_name_exits_2_and_names_the_bundled_ones(capsys, converted, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    os.symlink(converted, root / "toy-a")
    os.symlink(converted, root / "toy-b")
    monkeypatch.setattr(loading, "BUNDLED_DIR", str(root))
    code, _, err = _generate(capsys, "wegen-nope", tmp_path / "o.png")
    assert code == 2 and err.count("\n") == 1
    assert "checkpoint folder not found" in err and "a bundled name: toy-a, toy-b" in err
    assert not (tmp_path / "o.png").exists()


def test_generate_uses_the_checkpoints_recommendation_unless_told(capsys, recommending, tmp_path, spy):
    from wegen.engine import WeGenEngine

    calls = spy(WeGenEngine, "generate")
    out = tmp_path / "rec.png"
    code, _, err = run(capsys, "generate", "--checkpoint", recommending, "--prompt", "x", "--out", str(out))
    assert code == 0, err
    assert {k: calls[-1][k] for k in ("steps", "cfg", "width", "height", "feature_slice")} == {
        "steps": 2, "cfg": 1.5, "width": 48, "height": 32, "feature_slice": "aligned"}
    with Image.open(out) as im:
        assert im.size == (48, 32) and im.info["steps"] == "2" and im.info["cfg"] == "1.5"
    code, _, err = run(capsys, "generate", "--checkpoint", recommending, "--prompt", "x", "--out", str(out),
                       "--steps", "1", "--cfg", "3", "--size", "64x40", "--feature-slice", "official")
    assert code == 0, err
    assert {k: calls[-1][k] for k in ("steps", "cfg", "width", "height", "feature_slice")} == {
        "steps": 1, "cfg": 3.0, "width": 64, "height": 40, "feature_slice": "official"}
    with Image.open(out) as im:
        assert im.size == (64, 40) and im.info["steps"] == "1"


def test_release_settings_for_a_checkpoint_without_recommendation(capsys, tiny_ckpt, tmp_path, spy):
    from wegen.engine import WeGenEngine

    calls = spy(WeGenEngine, "generate")
    code, _, err = run(capsys, "generate", "--checkpoint", tiny_ckpt, "--prompt", "x", "--size", "64",
                       "--out", str(tmp_path / "o.png"), "--steps", "1")
    assert code == 0, err
    assert calls[-1]["cfg"] == 2.0 and calls[-1]["feature_slice"] == "official" and calls[-1]["steps"] == 1


def test_chat_and_reconstruct_use_the_recommendation(capsys, recommending, tmp_path, spy, image_file):
    from wegen import chat
    from wegen.engine import WeGenEngine

    turns = spy(chat, "chat_turn")
    code, _, err = run(capsys, "chat", "--checkpoint", recommending, "--session", "s", "--sessions-dir",
                       str(tmp_path / "sessions"), "a red circle", "--out", str(tmp_path / "c.png"))
    assert code == 0, err
    assert {k: turns[-1][k] for k in ("steps", "cfg", "width", "height", "feature_slice")} == {
        "steps": 2, "cfg": 1.5, "width": 48, "height": 32, "feature_slice": "aligned"}
    code, _, err = run(capsys, "chat", "--checkpoint", recommending, "--session", "s", "--sessions-dir",
                       str(tmp_path / "sessions"), "make it blue", "--out", str(tmp_path / "c2.png"),
                       "--steps", "1", "--feature-slice", "official")
    assert code == 0, err
    assert turns[-1]["steps"] == 1 and turns[-1]["feature_slice"] == "official"
    recs = spy(WeGenEngine, "reconstruct")
    code, _, err = run(capsys, "reconstruct", "--checkpoint", recommending, "--image", image_file,
                       "--out", str(tmp_path / "r.png"))
    assert code == 0, err
    assert (recs[-1]["steps"], recs[-1]["cfg"], recs[-1]["width"], recs[-1]["height"]) == (2, 1.5, 48, 32)


def test_sweep_takes_the_recommended_feature_slice(capsys, recommending, tmp_path, monkeypatch):
    from wegen import sweep

    seen = []

    def stop(prompts, seeds, settings):
        seen.append(settings)
        raise ValueError("stopped before any work")

    monkeypatch.setattr(sweep, "check_sweep_inputs", stop)
    code, _, err = run(capsys, "sweep", "--checkpoint", recommending, "--prompt", "x", "-n", "1",
                       "--out", str(tmp_path / "sw"))
    assert code == 2 and "stopped before any work" in err
    s = seen[-1]
    assert (s.steps, s.cfg, s.width, s.height, s.feature_slice) == (2, 1.5, 48, 32, "aligned")
    run(capsys, "sweep", "--checkpoint", recommending, "--prompt", "x", "-n", "1", "--out", str(tmp_path / "sw"),
        "--feature-slice", "official", "--steps", "3")
    assert (seen[-1].steps, seen[-1].feature_slice) == (3, "official")
