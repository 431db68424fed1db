"""Finite numbers only: NaN, inf and -inf at every entry (engine API, chat turns, nodes, command line) are refused
with a message naming the input, before anything is written; a chat turn whose model output is not finite saves
nothing."""
import hashlib
import json
import os

import pytest
import torch
from faults import folder_state

from wegen import chat, sessions
from wegen.cli import main
from wegen.rules import check_finite

BAD = [float("nan"), float("inf"), float("-inf")]
IDS = ["nan", "inf", "-inf"]
FAST = dict(steps=1, width=64, height=64)


def poisoned(shape, value):
    t = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    t.view(-1)[7] = value
    return t


def test_check_finite_names_the_input():
    assert check_finite(1.5, "cfg") == 1.5 and check_finite(3, "x") == 3
    assert check_finite(torch.arange(3), "ints") is not None  # integer tensors are always finite
    with pytest.raises(ValueError, match=r"cfg must be a finite number, got inf"):
        check_finite(float("inf"), "cfg")
    with pytest.raises(ValueError, match=r"images holds 1 non-finite value\(s\) \(NaN or inf\) among 12"):
        check_finite(poisoned((1, 2, 2, 3), float("nan")), "images")


# Engine API ------------------------------------------------------------------------------------------

def _engine_cases(value):
    ok_img = torch.rand(1, 64, 64, 3)
    feats = torch.randn(1, 64, 112)
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:24, 8:24] = 1
    return {
        "decode features": (lambda e: e.decode_pixels(poisoned((1, 64, 112), value), **FAST), "features"),
        "decode reference": (lambda e: e.decode_pixels(feats, reference=poisoned((1, 64, 64, 3), value), strength=0.5,
                                                **FAST), "reference"),
        "decode mask": (lambda e: e.decode_pixels(feats, reference=ok_img, mask=mask + poisoned((1, 64, 64), value) * 0,
                                           strength=0.5, **FAST), "mask"),
        "decode cfg": (lambda e: e.decode_pixels(feats, cfg=value, **FAST), "cfg"),
        "decode strength": (lambda e: e.decode_pixels(feats, reference=ok_img, strength=value, **FAST), "strength"),
        "generate cfg": (lambda e: e.generate("a fox", cfg=value, max_new_tokens=4, **FAST), "cfg"),
        "encode images": (lambda e: e.encode("a fox", poisoned((1, 32, 32, 3), value), max_new_tokens=4), "images"),
        "encode var_cfg_scale": (lambda e: e.encode("a fox", var_cfg_scale=value, max_new_tokens=4), "var_cfg_scale"),
        "encode temperature": (lambda e: e.encode("a fox", temperature=value, max_new_tokens=4), "temperature"),
        "understand images": (lambda e: e.understand(poisoned((1, 32, 32, 3), value), "what?"), "images"),
        "reconstruct images": (lambda e: e.reconstruct(poisoned((1, 32, 32, 3), value), **FAST), "images"),
        "encode_images": (lambda e: e.encode_images(poisoned((1, 32, 32, 3), value)), "images"),
    }


@pytest.mark.parametrize("value", BAD, ids=IDS)
@pytest.mark.parametrize("case", list(_engine_cases(0.0)))
def test_engine_refuses_non_finite_inputs(engine, case, value):
    run, name = _engine_cases(value)[case]
    with pytest.raises(ValueError, match=rf"{name}.*(finite|>= 0|in 0\.\.1)"):
        run(engine)


# Chat turns: nothing non-finite is ever committed -------------------------------------------------------


@pytest.fixture(scope="module")
def one_turn(engine, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("finite"))
    chat.chat_turn(engine, root, "s", "a red fox", seed=1, prefix_cache=None, **FAST)
    return root


def _chat_cases(value):
    mask = torch.zeros(64, 64)
    mask[8:24, 8:24] = 1
    return {
        "images": dict(images=poisoned((1, 32, 32, 3), value)),
        "mask": dict(mask=mask + poisoned((64, 64), value) * 0, strength=0.5),
        "reference": dict(reference=poisoned((1, 64, 64, 3), value), strength=0.5),
        "cfg": dict(cfg=value),
        "strength": dict(strength=value),
        "var_cfg_scale": dict(var_cfg_scale=value),
        "temperature": dict(temperature=value),
    }


@pytest.mark.parametrize("value", BAD, ids=IDS)
@pytest.mark.parametrize("case", list(_chat_cases(0.0)))
def test_chat_turn_refuses_non_finite_inputs_and_saves_nothing(engine, one_turn, case, value):
    before = folder_state(os.path.join(one_turn, "s"))
    with pytest.raises(ValueError, match=rf"{case}.*(finite|in 0\.\.1|>= 0)"):
        chat.chat_turn(engine, one_turn, "s", "again", seed=2, prefix_cache=None,
                       **dict(FAST, **_chat_cases(value)[case]))
    assert folder_state(os.path.join(one_turn, "s")) == before


@pytest.mark.parametrize("what", ["image", "features"])
def test_chat_turn_with_non_finite_model_output_saves_nothing(engine, one_turn, monkeypatch, what):
    before = folder_state(os.path.join(one_turn, "s"))
    if what == "image":
        monkeypatch.setattr(engine, "decode_pixels", lambda *a, **k: torch.full((1, 64, 64, 3), float("nan")))
    else:
        encode = chat._encode

        def nan_features(*a, **k):
            features, reply, stats = encode(*a, **k)
            return features * float("nan"), reply, stats
        monkeypatch.setattr(chat, "_encode", nan_features)
        monkeypatch.setattr(engine, "decode_pixels", lambda *a, **k: torch.zeros(1, 64, 64, 3))  # clean anyway
    with pytest.raises(ValueError, match=r"the model's image.*non-finite.*nothing was saved to chat session 's'"):
        chat.chat_turn(engine, one_turn, "s", "again", seed=2, prefix_cache=None, **FAST)
    assert folder_state(os.path.join(one_turn, "s")) == before


def test_stored_features_with_nan_are_refused(one_turn, tmp_path):
    import shutil

    root = str(tmp_path / "copy")
    shutil.copytree(one_turn, root)
    session = sessions.load_session(root, "s")
    turn = session.turns[0]
    data = sessions.features_bytes(poisoned((1, 64, 112), float("nan")))
    with open(session.path(turn.features), "wb") as f:
        f.write(data)
    raw = json.loads(open(session.path(sessions.SESSION_FILE), "rb").read())
    raw["turns"][0]["features_sha256"] = hashlib.sha256(data).hexdigest()  # tampered consistently
    with open(session.path(sessions.SESSION_FILE), "w") as f:
        json.dump(raw, f)
    session = sessions.load_session(root, "s")
    with pytest.raises(sessions.CorruptSessionError, match="is corrupt.*non-finite"):
        session.features(session.turns[0])


# Nodes --------------------------------------------------------------------------------------------------

@pytest.fixture
def model(comfy_host):
    from ComfyUI_WeGen.nodes.loader import WeGenLoader

    return WeGenLoader().load("tiny", "fp32", "cpu")[0]


def _node_cases(value, cond):
    from ComfyUI_WeGen.nodes import chat as chat_nodes
    from ComfyUI_WeGen.nodes.decode import WeGenConsistencyDecode, WeGenReconstruct
    from ComfyUI_WeGen.nodes.encode import WeGenMLLMEncode
    from ComfyUI_WeGen.nodes.understand import WeGenUnderstand

    img = poisoned((1, 64, 64, 3), value)
    ok = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:24, 8:24] = 1
    bad_mask = mask + poisoned((1, 64, 64), value) * 0

    def bad_cond():
        return type(cond)(poisoned(tuple(cond.features.shape), value), cond.texts, cond.prompts, cond.settings)
    dec = dict(seed=1, steps=1, cfg=2.0, width=64, height=64)

    def decode(m, **kw):
        return WeGenConsistencyDecode().decode(m, **{"cond": cond, **dec, **kw})

    def encode(m, **kw):
        return WeGenMLLMEncode().encode(m, **{"text": "a fox", "max_new_tokens": 4, **kw})

    def chat_turn(m, **kw):
        (ref,) = chat_nodes.WeGenChatMemory().open("nodes", "continue")
        return chat_nodes.WeGenChatTurn().turn(m, ref, "hello", **{**dec, **kw})

    return {
        "Encode images": (lambda m: encode(m, images=img), "images"),
        "Encode var_cfg_scale": (lambda m: encode(m, var_cfg_scale=value), "var_cfg_scale"),
        "Encode temperature": (lambda m: encode(m, temperature=value), "temperature"),
        "Decode cond": (lambda m: decode(m, cond=bad_cond()), "cond"),
        "Decode reference": (lambda m: decode(m, reference=img, strength=0.5), "reference"),
        "Decode mask": (lambda m: decode(m, reference=ok, mask=bad_mask), "mask"),
        "Decode cfg": (lambda m: decode(m, cfg=value), "cfg"),
        "Decode strength": (lambda m: decode(m, reference=ok, strength=value), "strength"),
        "Reconstruct images": (lambda m: WeGenReconstruct().reconstruct(m, img, **dec), "images"),
        "Reconstruct cfg": (lambda m: WeGenReconstruct().reconstruct(m, ok, **dict(dec, cfg=value)), "cfg"),
        "Understand images": (lambda m: WeGenUnderstand().understand(m, img, "what?"), "images"),
        "Understand temperature": (lambda m: WeGenUnderstand().understand(m, ok, "what?", temperature=value),
                                   "temperature"),
        "Chat Turn images": (lambda m: chat_turn(m, images=img), "images"),
        "Chat Turn mask": (lambda m: chat_turn(m, mask=bad_mask), "mask"),
        "Chat Turn cfg": (lambda m: chat_turn(m, cfg=value), "cfg"),
        "Chat Turn strength": (lambda m: chat_turn(m, strength=value), "strength"),
    }


@pytest.fixture(scope="module")
def cond(pack_engine):
    return pack_engine.encode("a red fox", max_new_tokens=4)


@pytest.mark.parametrize("value", BAD, ids=IDS)
@pytest.mark.parametrize("case", list(_node_cases(0.0, None)))
def test_nodes_refuse_non_finite_inputs(model, cond, comfy_host, case, value):
    from ComfyUI_WeGen.nodes import chat as chat_nodes

    run, name = _node_cases(value, cond)[case]
    with pytest.raises(ValueError, match=rf"{name}.*(finite|in 0\.\.1|>= 0)"):
        run(model)
    assert not os.path.exists(os.path.join(chat_nodes.sessions_root(), "nodes", sessions.SESSION_FILE))


# Command line -------------------------------------------------------------------------------------------

def _cli_cases(tmp, value, ckpt):
    base = ["--checkpoint", ckpt, "--steps", "1", "--size", "64", "--out", os.path.join(tmp, "o.png")]
    png = os.path.join(tmp, "in.png")
    chat_args = ["chat", *base, "--sessions-dir", os.path.join(tmp, "s"), "--session", "c", "hello"]
    v = repr(value)  # given as --flag=VALUE ("-inf" would read as an option)
    return {
        "generate --cfg": (["generate", *base, "--prompt", "a fox", f"--cfg={v}"], "cfg"),
        "generate --var-cfg": (["generate", *base, "--prompt", "a fox", f"--var-cfg={v}"], "--var-cfg"),
        "generate --image": (["generate", *base, "--prompt", "a fox", "--image", png], f"--image {png}"),
        "reconstruct --cfg": (["reconstruct", *base, "--image", png, f"--cfg={v}"], "cfg"),
        "reconstruct --image": (["reconstruct", *base, "--image", png], f"--image {png}"),
        "chat --cfg": ([*chat_args, f"--cfg={v}"], "cfg"),
        "chat --strength": ([*chat_args, f"--strength={v}"], "strength"),
        "chat --image": ([*chat_args, "--image", png], f"--image {png}"),
        "chat --mask": ([*chat_args, "--mask", png], f"--mask {png}"),
        "understand --image": (["understand", "--checkpoint", ckpt, "--image", png, "what?"], f"--image {png}"),
        "understand --temperature": (["understand", "--checkpoint", ckpt, "--image", os.path.join(tmp, "ok.png"),
                                      f"--temperature={v}", "what?"], "temperature"),
        "sweep --cfg": (["sweep", *base[:-2], "--prompt", "a fox", "-n", "1", "--seeds", "1", f"--cfg={v}",
                         "--out", os.path.join(tmp, "sw")], "cfg"),
        "rewrite --temperature": (["rewrite", "--checkpoint", ckpt, "--prompt", "a fox", "-n", "1",
                                   f"--temperature={v}"], "temperature"),
    }


@pytest.mark.parametrize("value", BAD, ids=IDS)
@pytest.mark.parametrize("case", list(_cli_cases("/t", 0.0, "ck")))
def test_cli_refuses_non_finite_inputs(tiny_ckpt, tmp_path, capsys, monkeypatch, case, value):
    from wegen import images

    tmp = str(tmp_path)
    images.save_png(torch.rand(64, 64, 3), os.path.join(tmp, "in.png"))
    images.save_png(torch.rand(64, 64, 3), os.path.join(tmp, "ok.png"))
    load = images.load_image
    # a decoder that yields non-finite pixels (e.g. a float TIFF holding NaN) stands in for in.png
    monkeypatch.setattr(images, "load_image", lambda p: poisoned(tuple(load(p).shape), value)
                        if p.endswith("in.png") else load(p))
    argv, name = _cli_cases(tmp, value, tiny_ckpt)[case]
    code = main(argv)
    err = capsys.readouterr()[1]
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert name in err and ("finite" in err or "in 0..1" in err), err
    assert not os.path.exists(os.path.join(tmp, "o.png")) and not os.path.exists(os.path.join(tmp, "s", "c"))
    assert not os.path.exists(os.path.join(tmp, "sw", "sweep.json"))
