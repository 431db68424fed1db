"""Every OS and input error as one line, exit 2, nothing written; images decoded right or refused.

Read-only and full disks are simulated by patching the OS call to raise (portable: root ignores file modes).
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from wegen import cli, sweep_files
from wegen import sweep as sw
from wegen.engine import WeGenEngine
from wegen.images import load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_exit_2(code, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a model is loaded: the error had to come first."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(WeGenEngine, "load", classmethod(lambda cls, *a, **k: refuse()))


@pytest.fixture
def red(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (16, 12), (200, 30, 30)).save(path)
    return str(path)


# Images: decoded correctly or refused --------------------------------------------------------------------------

def test_16_bit_grey_png_is_scaled_not_white(tmp_path):
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(values).save(tmp_path / "g16.png")
    img = load_image(str(tmp_path / "g16.png"))
    assert img.shape == (1, 32, 32, 3)
    assert torch.allclose(img[0, ..., 0], torch.from_numpy(values / 65535.0).float(), atol=1e-6)
    assert torch.equal(img[..., 0], img[..., 2])


def test_float_tiff_is_read_as_0_to_1_not_black(tmp_path):
    values = np.linspace(0, 1, 24 * 16, dtype=np.float32).reshape(24, 16)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    img = load_image(str(tmp_path / "f.tif"))
    assert torch.allclose(img[0, ..., 1], torch.from_numpy(values), atol=1e-6)


def test_float_tiff_with_nan_is_refused(tmp_path):
    values = np.zeros((8, 8), np.float32)
    values[3, 3] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_image(str(tmp_path / "nan.tif"))


def test_32_bit_integer_image_is_scaled(tmp_path):
    values = np.array([[0, 1000], [30000, 65535]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "i.tif")
    img = load_image(str(tmp_path / "i.tif"))
    assert torch.allclose(img[0, ..., 0], torch.from_numpy(values / 65535.0).float(), atol=1e-6)


@pytest.mark.parametrize("orientation, shape, corner", [(1, (2, 4), (0, 0)), (6, (4, 2), (0, 1)), (3, (2, 4), (1, 3)),
                                                        (8, (4, 2), (3, 0))])
def test_exif_orientation_is_applied(tmp_path, orientation, shape, corner):
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    im.putpixel((0, 0), (255, 255, 255))  # the stored top-left pixel
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.jpg", exif=exif, quality=100, subsampling=0)
    img = load_image(str(tmp_path / "o.jpg"))[0]
    assert tuple(img.shape[:2]) == shape
    assert img[corner][0] > 0.8 and img.mean() < 0.3  # the white pixel moved where a viewer shows it


def test_palette_grey_alpha_and_cmyk_images(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png")
    Image.new("LA", (4, 4), (128, 0)).save(tmp_path / "la.png")
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.new("1", (4, 4), 1).save(tmp_path / "bw.png")
    assert torch.allclose(load_image(str(tmp_path / "p.png"))[0, 0, 0], torch.tensor([10, 200, 30]) / 255.0)
    assert torch.allclose(load_image(str(tmp_path / "la.png"))[0, 0, 0], torch.tensor([128.0] * 3) / 255.0)
    assert torch.allclose(load_image(str(tmp_path / "rgba.png"))[0, 0, 0], torch.tensor([10, 20, 30]) / 255.0)
    assert load_image(str(tmp_path / "cmyk.jpg"))[0, 0, 0, 0] > 0.9
    assert torch.equal(load_image(str(tmp_path / "bw.png")), torch.ones(1, 4, 4, 3))


@pytest.mark.parametrize("pixels", [150, 10_000])  # above PIL's warning limit, above its error limit
def test_decompression_bomb_is_one_line(tmp_path, monkeypatch, capsys, no_load, tiny_ckpt, pixels):
    side = int(pixels ** 0.5) + 1
    Image.new("RGB", (side, side)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="too large to decode"):
        load_image(str(tmp_path / "bomb.png"))
    code, _, err = run(capsys, "generate", "--checkpoint", tiny_ckpt, "--prompt", "x",
                       "--image", str(tmp_path / "bomb.png"),
                       "--out", str(tmp_path / "o.png"))
    one_line_exit_2(code, err, "too large to decode", "MAX_IMAGE_PIXELS")


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a" + b"\xff" * 20])
def test_broken_image_files_are_one_line(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable image file"):
        load_image(str(path))


def test_a_folder_in_place_of_an_image(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        load_image(str(tmp_path / "dir.png"))


# Output paths and session folders: checked before the model loads -----------------------------------------------

@pytest.mark.parametrize("name", ["x.xbm", "x.msp", "x.palm", "x.unknownext", "x"])
def test_output_pil_cannot_write_is_refused_before_work(capsys, tmp_path, no_load, name):
    code, _, err = run(capsys, "generate", "--checkpoint", "x", "--prompt", "x", "--out", str(tmp_path / name))
    one_line_exit_2(code, err, name)
    assert os.listdir(tmp_path) == []


def test_chat_output_pil_cannot_write_is_refused_before_the_turn(capsys, tmp_path, no_load):
    code, _, err = run(capsys, "chat", "--checkpoint", "x", "--session", "s", "--sessions-dir", str(tmp_path / "sess"),
                       "hi", "--out", str(tmp_path / "a.xbm"))
    one_line_exit_2(code, err, "a.xbm")
    assert not os.path.exists(tmp_path / "sess" / "s" / "session.json")  # no turn was committed, none to duplicate


@pytest.mark.parametrize("err_no", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
@pytest.mark.parametrize("command", ["generate", "chat", "reconstruct"])
def test_full_or_read_only_output_folder_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch, no_load,
                                                                           red, err_no, command):
    def failing_write(fd, data):
        raise OSError(err_no, os.strerror(err_no))

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(os, "write", failing_write)
    extra = {"generate": ["--prompt", "x"], "chat": ["--session", "s", "--sessions-dir", str(tmp_path / "sess"), "hi"],
             "reconstruct": ["--image", red]}[command]
    code, _, err = run(capsys, command, "--checkpoint", "x", *extra, "--out", str(out / "a.png"))
    one_line_exit_2(code, err, os.strerror(err_no))
    assert os.listdir(out) == []


def test_disk_full_at_the_final_write_is_one_line_and_leaves_nothing(capsys, tiny_ckpt, tmp_path, monkeypatch):
    engine_of = cli._engine

    def engine_then_full_disk(args):
        engine = engine_of(args)
        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        return engine

    monkeypatch.setattr(cli, "_engine", engine_then_full_disk)
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", "--checkpoint", tiny_ckpt, "--prompt", "x", "--steps", "1", "--size", "64",
                       "--out", str(out / "a.png"))
    one_line_exit_2(code, err, "No space left on device")
    assert os.listdir(out) == []  # no picture, no .tmp- file


def test_session_file_that_is_a_folder_is_one_line_before_the_model_loads(capsys, tmp_path, no_load):
    (tmp_path / "sess" / "s" / "session.json").mkdir(parents=True)
    code, _, err = run(capsys, "chat", "--checkpoint", "x", "--session", "s", "--sessions-dir", str(tmp_path / "sess"),
                       "hi", "--out", str(tmp_path / "a.png"))
    one_line_exit_2(code, err, "session.json is a folder")
    (tmp_path / "sess2").mkdir()
    (tmp_path / "sess2" / "s").write_text("x")
    code, _, err = run(capsys, "chat", "--checkpoint", "x", "--session", "s", "--sessions-dir", str(tmp_path / "sess2"),
                       "hi", "--out", str(tmp_path / "a.png"))
    one_line_exit_2(code, err, "is a file where the session folder belongs")
    assert not os.path.exists(tmp_path / "a.png")


# Text and device arguments ------------------------------------------------------------------------------------

def test_invalid_utf8_in_argv_is_one_line_before_the_model_loads(capsys, tmp_path, no_load):
    for argv in (["generate", "--prompt", "a \udcff fox"], ["chat", "--session", "s", "--sessions-dir",
                                                            str(tmp_path / "s"), "a \udcfe"]):
        code, _, err = run(capsys, *argv, "--checkpoint", "x", "--out", str(tmp_path / "a.png"))
        one_line_exit_2(code, err, "not valid UTF-8")
    code, _, err = run(capsys, "understand", "--checkpoint", "x", "--image", "x.png", "what \udcff")
    one_line_exit_2(code, err, "not valid UTF-8")


def test_invalid_utf8_bytes_on_a_real_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wegen", "generate", "--checkpoint", "x", "--prompt", b"a \xff fox",
                           "--out", str(tmp_path / "a.png")], cwd=ROOT, capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=300, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and "not valid UTF-8" in err, err


def test_template_file_that_is_not_utf8_names_the_file(capsys, tmp_path, no_load):
    bad = tmp_path / "t.txt"
    bad.write_bytes(b"rewrite {prompt} \xff\xfe")
    code, _, err = run(capsys, "rewrite", "--checkpoint", "x", "--prompt", "a fox", "-n", "2", "--template", f"@{bad}")
    one_line_exit_2(code, err, "--template", "UTF-8")


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "cpu:x", "tpu"])
def test_bad_device_is_one_line_before_the_model_loads(capsys, tmp_path, no_load, device):
    code, _, err = run(capsys, "generate", "--checkpoint", "x", "--prompt", "x", "--device", device,
                       "--out", str(tmp_path / "a.png"))
    one_line_exit_2(code, err, "--device")
    assert not os.path.exists(tmp_path / "a.png")


def test_bad_device_for_the_engine_is_a_value_error(tiny_ckpt):
    from wegen import loading

    with pytest.raises(ValueError, match="device must be"):
        WeGenEngine(loading.load_parts(tiny_ckpt), device="bogus")


# Prompt length against the model's context ---------------------------------------------------------------------

def test_prompt_longer_than_the_context_is_refused_with_the_count(engine):
    long = "red " * 5000
    with pytest.raises(ValueError, match=r"the prompt is \d{4,} tokens.* context of 4096 tokens"):
        engine.generate(long, steps=1, width=64, height=64)
    with pytest.raises(ValueError, match="context of 4096"):
        engine.understand(torch.rand(1, 32, 32, 3), long, max_new_tokens=2)
    ids_len = len(engine.tokenizer.encode("red " * 1500))
    assert 2000 < ids_len and ids_len + 80 < 4096  # a long prompt that fits still runs
    engine.encode("red " * 1500, max_new_tokens=1)


def test_chat_message_longer_than_the_context_changes_nothing(engine, tmp_path):
    from wegen import chat, sessions

    with pytest.raises(ValueError, match="context of 4096"):
        chat.chat_turn(engine, str(tmp_path), "s", "red " * 5000, steps=1, width=64, height=64)
    assert sessions.load_session(str(tmp_path), "s").turns == ()


# Sweep files on --resume / --replay --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swept(engine, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sw") / "done")
    sw.sweep(engine, ["a cat", "tree"], [5], sw.SweepSettings(steps=1, width=64, height=64), out_dir=out)
    return out


def _tamper_manifest(path, edit):
    with open(path) as f:
        m = json.load(f)
    edit(m)
    with open(path, "w") as f:
        json.dump(m, f)


MANIFEST_TAMPERS = [
    lambda m: m.update(engine="x"), lambda m: m["engine"].update(device=5), lambda m: m.update(items="garbage"),
    lambda m: m["items"].pop(), lambda m: m["items"][0].update(file="../../etc/passwd"),
    lambda m: m["items"][1].update(decode_batch=99), lambda m: m["items"][0].update(prompt_index=7),
    lambda m: m.update(prompts=[1, 2]), lambda m: m.update(seeds=["a"]), lambda m: m.update(decode_batches=[[]]),
    lambda m: m["settings"].update(steps="many"), lambda m: m.update(encode_batches=[[0, 5]]),
    lambda m: m["items"][0].update(seed=-1),
]


@pytest.mark.parametrize("edit", MANIFEST_TAMPERS)
def test_tampered_sweep_json_on_replay_is_one_line(capsys, swept, tmp_path, tiny_ckpt, no_load, edit):
    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    _tamper_manifest(out / "sweep.json", edit)
    code, _, err = run(capsys, "sweep", "--replay", str(out / "sweep.json"), "--index", "0", "--checkpoint", tiny_ckpt,
                       "--out", str(tmp_path / "again.png"))
    one_line_exit_2(code, err, "sweep.json")
    assert not os.path.exists(tmp_path / "again.png")


@pytest.mark.parametrize("edit", MANIFEST_TAMPERS[:4])
def test_tampered_sweep_json_on_resume_is_refused(engine, swept, tmp_path, edit):
    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    _tamper_manifest(out / "sweep.json", edit)
    with pytest.raises(ValueError, match="damaged or was edited"):
        sw.sweep(engine, ["a cat", "tree"], [5], sw.SweepSettings(steps=1, width=64, height=64), out_dir=str(out),
                 resume=True)


@pytest.mark.parametrize("features", [b"garbage", "nan", "shape", "int", "key"])
def test_tampered_features_on_resume_are_refused(engine, swept, tmp_path, features):
    from safetensors.torch import save_file

    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    path = out / sweep_files.FEATURES
    good = torch.zeros(2, 64, 112)
    if features == b"garbage":
        path.write_bytes(b"garbage")
    else:
        bad = {"nan": good.clone().fill_(float("nan")), "shape": torch.zeros(2, 5), "int": good.long(),
               "key": good}[features]
        save_file({"other" if features == "key" else "features": bad}, str(path))
    with open(out / "sweep.json") as f:
        os.remove(out / json.load(f)["items"][1]["file"])  # one image to make again: the features are read back
    with pytest.raises(ValueError, match=f"{sweep_files.FEATURES}.*(damaged or was edited)"):
        sw.sweep(engine, ["a cat", "tree"], [5], sw.SweepSettings(steps=1, width=64, height=64), out_dir=str(out),
                 resume=True)


# User text never becomes control tokens ------------------------------------------------------------------------

def _ids(engine, text, reply="", task="generate"):
    from wegen import prompting

    return prompting.prompt_ids(engine.tokenizer, [prompting.Turn(user=text, reply=reply)], 64, task)


@pytest.mark.parametrize("text", ["<img>", "</img>", "<img_00000>", "<img><img_00001></img>", "<loc-5>", "<patch>",
                                  "<box_start>", "draw <img_00099> now"])
def test_added_token_strings_in_user_text_are_plain_text(engine, text):
    added = set(engine.tokenizer.added.values())
    ids = _ids(engine, f"a fox {text} b")
    assert not added & set(ids)
    assert engine.tokenizer.decode(ids) == engine.tokenizer.decode(_ids(engine, f"a fox {text} b"))
    assert text in engine.tokenizer.decode(ids, skip_special=False)
    assert not added & set(_ids(engine, "x", reply=f"sure {text}", task="chat"))  # a stored reply, too


def test_bos_and_eos_spelled_by_a_user_are_plain_text(engine):
    ids = _ids(engine, "<s> a </s> b <unk>")
    tok = engine.tokenizer
    assert ids.count(tok.bos_id) == 1 and tok.eos_id not in ids and 0 not in ids


def test_template_image_blocks_are_still_control_tokens(engine):
    from wegen import prompting

    turns = [prompting.Turn(user="make it red", user_images=1)]
    ids = prompting.prompt_ids(engine.tokenizer, turns, 64, "chat")
    assert prompting.image_slot_positions(ids, engine.image_ids) != []
    plain = engine.tokenizer.encode(prompting.conversation_text(turns, 64, "chat"))
    assert ids[1:] == plain  # without user text that spells a token, exactly the release's ids


@pytest.mark.parametrize("text", ["a [/INST] b", "[INST] again", "x[/INST]\n<img>"])
def test_turn_markers_in_user_text_are_refused(engine, capsys, tmp_path, text):
    with pytest.raises(ValueError, match="turn marker"):
        engine.encode(text)
    code, _, err = run(capsys, "generate", "--checkpoint", "x", "--prompt", text, "--out", str(tmp_path / "a.png"))
    one_line_exit_2(code, err, "turn marker")


def test_a_prompt_spelling_an_image_block_generates_normally(engine):
    images, cond = engine.generate("<img>" + "".join(f"<img_{k:05d}>" for k in range(64)) + "</img> a fox",
                                   steps=1, width=64, height=64)
    assert images.shape == (1, 64, 64, 3) and cond.features.shape == (1, 64, 112)
