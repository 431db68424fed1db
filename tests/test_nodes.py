"""Node contract tests under stand-in ComfyUI modules (tests/host_stubs.py): INPUT_TYPES, return tuples,
IMAGE layout, seeds, interrupts, bad inputs. Tiny checkpoint, 64 px, 2-3 steps."""
from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
from ComfyUI_WeGen.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
from ComfyUI_WeGen.nodes.decode import WeGenConsistencyDecode, WeGenReconstruct
from ComfyUI_WeGen.nodes.encode import WeGenMLLMEncode
from ComfyUI_WeGen.nodes.loader import WeGenLoader
from ComfyUI_WeGen.nodes.understand import WeGenUnderstand

from host_stubs import InterruptProcessingException

SMALL = dict(steps=2, cfg=2.0, width=64, height=64)
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="session")
def engine(pack_engine):
    """The nodes' copy of the engine (ComfyUI_WeGen.wegen): the one their loader caches."""
    return pack_engine


@pytest.fixture
def model(comfy_host):
    return WeGenLoader().load("tiny", "fp32", "cpu")[0]


@pytest.fixture(scope="module")
def cond(engine):
    return engine.encode("a red fox in the snow", max_new_tokens=8)


def image(B=1, H=64, W=64, seed=0):
    return torch.rand(B, H, W, 3, generator=torch.Generator().manual_seed(seed))


def check_image(out, B, H, W):
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert tuple(out.shape) == (B, H, W, 3)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def center_mask(B=1, H=64, W=64):
    mask = torch.zeros(B, H, W)
    mask[:, H // 4:3 * H // 4, W // 4:3 * W // 4] = 1.0
    return mask


# Declarations ------------------------------------------------------------------------------------

def test_mappings_ids_titles_and_display_names():
    assert set(NODE_CLASS_MAPPINGS) >= {"WeGenLoader", "WeGenMLLMEncode", "WeGenConsistencyDecode",
                                        "WeGenUnderstand", "WeGenReconstruct"}
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("WeGen") and cls.CATEGORY.startswith("WeGen/"), node_id
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id] == cls.TITLE
        assert len(cls.DESCRIPTION) > 40 and callable(getattr(cls, cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple)
        assert len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_input_types_well_formed(comfy_host, node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, name
            kind, opts = entry[0], entry[1] if len(entry) == 2 else {}
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
            assert name in params, f"{node_id}.{cls.FUNCTION} does not take {name}"
            if section == "optional":
                assert params[name].default is not inspect.Parameter.empty, name
            if isinstance(kind, list):
                assert "default" not in opts or opts["default"] in kind, name
            elif kind in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], name
                if params[name].default is not inspect.Parameter.empty:
                    assert params[name].default == opts["default"], f"{node_id}.{name}: widget/function defaults"
            else:
                assert kind in WIDGETS or (kind.isupper() and kind.replace("_", "").isalpha()), name
    for name in spec.get("hidden", {}):
        assert name in params


def test_seed_widgets():
    for cls in (WeGenConsistencyDecode, WeGenReconstruct):
        kind, opts = cls.INPUT_TYPES()["required"]["seed"]
        assert (kind, opts["min"], opts["max"], opts["control_after_generate"]) == ("INT", 0, 2**64 - 1, True)
    for cls in (WeGenMLLMEncode, WeGenUnderstand):  # the seed only matters at temperature > 0: no randomize
        assert cls.INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is False


def test_extensions_are_labelled():
    assert "extension" in WeGenConsistencyDecode.DESCRIPTION.lower()
    opts = {n: e[1] for n, e in WeGenMLLMEncode.INPUT_TYPES()["required"].items()}
    for name in ("force_image", "feature_slice", "temperature"):
        assert "extension" in opts[name]["tooltip"].lower(), name
    for name, entry in WeGenConsistencyDecode.INPUT_TYPES()["optional"].items():
        assert "extension" in entry[1]["tooltip"].lower(), name


# Loader --------------------------------------------------------------------------------------------

def test_loader_lists_checkpoint_folders(comfy_host, tmp_path, tiny_ckpt):
    import os

    extra = tmp_path / "extra"
    (extra / "not_a_checkpoint").mkdir(parents=True)
    os.symlink(tiny_ckpt, extra / "tiny_copy")
    (extra / "stray_file.txt").write_text("x")
    folder_paths = comfy_host.modules["folder_paths"]
    folder_paths.add_model_folder_path("wegen", str(extra))  # what an extra_model_paths.yaml entry does
    names, opts = WeGenLoader.INPUT_TYPES()["required"]["checkpoint"]
    assert names == ["wegen-toy", "tiny", "tiny_copy"]  # the bundled checkpoint first, with no setup
    assert opts["default"] == "wegen-toy"
    assert os.path.join(comfy_host.models_dir, "wegen") in folder_paths.get_folder_paths("wegen")


def test_loader_finds_the_bundled_checkpoint_by_name(comfy_host):
    from ComfyUI_WeGen.wegen.loading import BUNDLED_DIR

    assert host.find_checkpoint("wegen-toy") == os.path.join(BUNDLED_DIR, "wegen-toy")
    model = WeGenLoader().load("wegen-toy", "fp32", "cpu")[0]
    assert model.checkpoint == os.path.join(BUNDLED_DIR, "wegen-toy")
    assert "wegen-toy" in WeGenLoader.DESCRIPTION


def test_a_model_folder_named_like_a_bundled_checkpoint_replaces_it(comfy_host, tmp_path, tiny_ckpt):
    extra = tmp_path / "extra"
    extra.mkdir()
    os.symlink(tiny_ckpt, extra / "wegen-toy")
    comfy_host.modules["folder_paths"].add_model_folder_path("wegen", str(extra))
    names = WeGenLoader.INPUT_TYPES()["required"]["checkpoint"][0]
    assert names == ["wegen-toy", "tiny"]  # listed once
    assert host.find_checkpoint("wegen-toy") == str(extra / "wegen-toy")


def test_bundled_checkpoint_listed_without_comfyui(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no models/wegen here
    assert host.comfy() is None
    assert host.list_checkpoints()[0] == "wegen-toy"
    assert WeGenLoader.INPUT_TYPES()["required"]["checkpoint"][1]["default"] == "wegen-toy"


def test_loader_returns_handle_to_cached_engine(model, engine):
    assert isinstance(model, host.WeGenModel) and (model.dtype, model.device) == ("fp32", "cpu")
    assert host.load_engine(model) is engine


def test_loader_auto_dtype_shares_the_engine(comfy_host, engine):
    handle = WeGenLoader().load("tiny", "auto", "gpu")[0]  # stand-in host: the "GPU" is the CPU
    assert host.load_engine(handle) is engine


@pytest.mark.parametrize("args, error, words", [
    (("nope", "fp32", "cpu"), FileNotFoundError, ["'nope'", "wegen", "make-tiny"]),
    (("tiny", "int8", "cpu"), ValueError, ["dtype", "'int8'", "fp32"]),
    (("tiny", "fp32", "tpu"), ValueError, ["device", "'tpu'", "offload when idle"]),
    (("", "fp32", "cpu"), ValueError, ["checkpoint", "models/wegen"]),
])
def test_loader_bad_inputs(comfy_host, args, error, words):
    with pytest.raises(error) as e:
        WeGenLoader().load(*args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_loader_names_missing_files(comfy_host, tmp_path):
    broken = tmp_path / "broken"
    (broken / "pretrained").mkdir(parents=True)
    comfy_host.modules["folder_paths"].add_model_folder_path("wegen", str(tmp_path))
    with pytest.raises(ValueError, match="missing .*broken"):
        WeGenLoader().load("broken", "fp32", "cpu")


# MLLM Encode ---------------------------------------------------------------------------------------

def test_encode_returns_cond_and_reply(model):
    cond, reply = WeGenMLLMEncode().encode(model, "a red fox", max_new_tokens=8)
    assert tuple(cond.features.shape) == (1, 64, 112) and cond.features.dtype == torch.float32
    assert isinstance(reply, str) and reply == cond.texts[0]


def test_encode_with_image_batch_and_same_seed(model):
    node, refs = WeGenMLLMEncode(), image(B=2)
    a = node.encode(model, "", seed=7, temperature=0.8, max_new_tokens=4, images=refs)[0]
    b = node.encode(model, "", seed=7, temperature=0.8, max_new_tokens=4, images=refs)[0]
    single = node.encode(model, "", max_new_tokens=4, images=refs[:1])[0]
    assert torch.equal(a.features, b.features)
    assert not torch.equal(a.features, single.features)  # both images entered the prompt


@pytest.mark.parametrize("kwargs, words", [
    (dict(text=""), ["text is empty", "images"]),
    (dict(text=3), ["text must be a string"]),
    (dict(text="x", images=torch.rand(1, 64, 64, 4)), ["images", "3 RGB channels", "alpha"]),
    (dict(text="x", images=torch.zeros(1, 64, 64, 3, dtype=torch.uint8)), ["images", "floats"]),
    (dict(text="x", temperature=-1.0), ["temperature", "-1.0"]),
    (dict(text="x", top_p=0.0), ["top_p"]),
    (dict(text="x", feature_slice="middle"), ["feature_slice", "'middle'"]),
    (dict(text="x", seed=-1), ["seed", "-1"]),
])
def test_encode_bad_inputs(model, kwargs, words):
    with pytest.raises(ValueError) as e:
        WeGenMLLMEncode().encode(model, max_new_tokens=4, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_encode_rejects_a_foreign_model(comfy_host):
    with pytest.raises(ValueError, match="WEGEN_MODEL from a WeGen Loader"):
        WeGenMLLMEncode().encode("tiny", "x")


# Consistency Decode -------------------------------------------------------------------------------

def test_decode_image_layout_and_seeds(model, cond):
    node = WeGenConsistencyDecode()
    out = node.decode(model, cond, seed=5, **SMALL)
    assert isinstance(out, tuple) and len(out) == len(node.RETURN_TYPES)
    check_image(out[0], 1, 64, 64)
    assert torch.equal(out[0], node.decode(model, cond, seed=5, **SMALL)[0])
    assert not torch.equal(out[0], node.decode(model, cond, seed=6, **SMALL)[0])


def test_decode_batch_of_references_uses_seed_plus_row(model, cond):
    node, ref = WeGenConsistencyDecode(), image(B=2)
    out = node.decode(model, cond, seed=5, reference=ref, strength=0.5, **SMALL)[0]
    check_image(out, 2, 64, 64)
    row1 = node.decode(model, cond, seed=6, reference=ref[1:], strength=0.5, **SMALL)[0]
    assert torch.allclose(out[1:], row1, atol=1e-4)  # batched kernels may round differently
    assert not torch.allclose(out[:1], row1, atol=1e-2)


def test_decode_seed_wraps_at_the_top_of_the_range(model, cond):
    node, ref = WeGenConsistencyDecode(), image(B=2)
    out = node.decode(model, cond, seed=2**64 - 1, reference=ref, strength=0.5, **SMALL)[0]
    row1 = node.decode(model, cond, seed=0, reference=ref[1:], strength=0.5, **SMALL)[0]
    assert torch.allclose(out[1:], row1, atol=1e-4)


def test_decode_mask_keeps_the_reference_outside(model, cond):
    ref, mask = image(), center_mask()
    out = WeGenConsistencyDecode().decode(model, cond, seed=1, reference=ref, mask=mask, strength=1.0, feather=4,
                                          **SMALL)[0]
    check_image(out, 1, 64, 64)
    keep = torch.ones(64, 64, dtype=torch.bool)
    keep[16 - 4:48 + 4, 16 - 4:48 + 4] = False  # mask + feather
    assert torch.equal(out[0][keep], ref[0][keep])
    assert not torch.equal(out[0][~keep], ref[0][~keep])


def test_decode_accepts_a_2d_mask_of_the_same_aspect(model, cond):
    mask = center_mask(H=32, W=32)[0]  # (H, W), half size
    out = WeGenConsistencyDecode().decode(model, cond, seed=1, reference=image(), mask=mask, strength=0.7, **SMALL)
    check_image(out[0], 1, 64, 64)


@pytest.mark.parametrize("kwargs, words", [
    (dict(mask=center_mask()), ["mask needs a reference"]),
    (dict(strength=0.5), ["strength 0.5 needs a reference"]),
    (dict(reference=image()), ["reference without a mask needs strength < 1"]),
    (dict(reference=image(H=48), strength=0.5), ["reference is 64x48", "width x height is 64x64"]),
    (dict(reference=image(), mask=torch.zeros(1, 64, 64)), ["mask row(s) [0] are empty", "LoadImage"]),
    (dict(reference=image(), mask=torch.ones(1, 64, 64)), ["covers every pixel", "strength"]),
    (dict(reference=image(), mask=center_mask(H=64, W=32)), ["mask is 32x64", "aspect"]),
    (dict(reference=image(B=3), strength=0.5, mask=center_mask(B=2)), ["batch sizes", "reference has 3", "mask has 2"]),
    (dict(reference=image(), mask=center_mask(), feather=-1), ["feather", "-1"]),
    (dict(strength=1.5), ["strength must be in 0..1"]),
    (dict(width=60), ["width", "multiple of 8", "60"]),
    (dict(steps=-1), ["steps", "1..1000"]),
    (dict(cfg=-0.5), ["cfg", ">= 0", "-1", "checkpoint's recommendation"]),
    (dict(reference=image(), strength=0.01, steps=2), ["no denoising step"]),
])
def test_decode_refuses_what_it_cannot_do(model, cond, kwargs, words):
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError) as e:
        WeGenConsistencyDecode().decode(model, cond, seed=0, **args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_decode_rejects_bad_conds(model, engine):
    with pytest.raises(ValueError, match="WEGEN_COND from a WeGen MLLM Encode"):
        WeGenConsistencyDecode().decode(model, "a cat", seed=0, **SMALL)
    foreign = type("Cond", (), {"features": torch.zeros(1, 64, 1792)})()
    with pytest.raises(ValueError, match=r"\(1, 64, 1792\).*same checkpoint"):
        WeGenConsistencyDecode().decode(model, foreign, seed=0, **SMALL)
    two = engine.encode(["a", "b"], max_new_tokens=4)
    with pytest.raises(ValueError, match="cond has 2"):
        WeGenConsistencyDecode().decode(model, two, seed=0, reference=image(B=3), strength=0.5, **SMALL)


# Reconstruct and Understand -----------------------------------------------------------------------

def test_reconstruct_batch_and_seed(model):
    node, pics = WeGenReconstruct(), image(B=2, H=40, W=56)
    out = node.reconstruct(model, pics, seed=3, **SMALL)
    assert len(out) == 1
    check_image(out[0], 2, 64, 64)
    assert torch.equal(out[0], node.reconstruct(model, pics, seed=3, **SMALL)[0])


@pytest.mark.parametrize("kwargs, words", [
    (dict(images=torch.rand(64, 64)), ["images", "(B, H, W, 3)"]),
    (dict(images="pic.png"), ["images must be an IMAGE"]),
    (dict(height=-8), ["height", "multiple of 8"]),
])
def test_reconstruct_bad_inputs(model, kwargs, words):
    args = {"images": image(), "seed": 0, **SMALL, **kwargs}
    with pytest.raises(ValueError) as e:
        WeGenReconstruct().reconstruct(model, **args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_understand_returns_text_and_shows_it(comfy_host, model):
    node = WeGenUnderstand()
    out = node.understand(model, image(B=2), "What is this?", max_new_tokens=6, unique_id="7")
    assert isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], str)
    assert out == node.understand(model, image(B=2), "What is this?", max_new_tokens=6)
    assert comfy_host.texts[0] == ("7", out[0])


@pytest.mark.parametrize("kwargs, words", [
    (dict(question="  "), ["question is empty"]),
    (dict(images=None), ["images must be an IMAGE"]),
    (dict(max_new_tokens=0), ["max_new_tokens", "0"]),
])
def test_understand_bad_inputs(model, kwargs, words):
    args = {"images": image(), "question": "What?", **kwargs}
    with pytest.raises(ValueError) as e:
        WeGenUnderstand().understand(model, **args)
    assert all(w in str(e.value) for w in words), str(e.value)


# Progress, previews, interrupts ---------------------------------------------------------------------

def test_progress_bars_over_tokens_and_steps_with_previews(comfy_host, model, cond):
    WeGenMLLMEncode().encode(model, "a fox", max_new_tokens=4)
    token_updates = list(comfy_host.updates)
    assert token_updates[-1][:2] == (65, 65) and all(p is None for *_, p in token_updates)  # 64 slots + </img>
    comfy_host.updates.clear()
    WeGenConsistencyDecode().decode(model, cond, seed=0, **{**SMALL, "steps": 5})
    assert [u[:2] for u in comfy_host.updates] == [(i, 5) for i in range(1, 6)]
    previews = [p for *_, p in comfy_host.updates]
    assert [p is not None for p in previews] == [False, True, False, True, True]  # every 2nd step and the last
    kind, picture, size = previews[1]
    assert (kind, picture.size, size) == ("JPEG", (8, 8), 512)  # latent resolution


def test_no_previews_when_the_host_turns_them_off(monkeypatch, tiny_ckpt, model, cond):
    import os

    import host_stubs

    stub = host_stubs.install(monkeypatch, os.path.dirname(os.path.dirname(model.checkpoint)), preview_method="none")
    WeGenConsistencyDecode().decode(model, cond, seed=0, **SMALL)
    assert len(stub.updates) == 2 and all(p is None for *_, p in stub.updates)


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *a: calls.append(1))


@pytest.mark.parametrize("stage", ["denoise", "tokens", "understand", "reconstruct"])
def test_interrupt_stops_within_one_step(comfy_host, model, cond, engine, stage):
    comfy_host.interrupt_at_update = 3
    module = engine.mllm if stage in ("tokens", "understand") else engine.unet
    calls, hook = _count_calls(module)
    run = {"denoise": lambda: WeGenConsistencyDecode().decode(model, cond, seed=0, **{**SMALL, "steps": 20}),
           "tokens": lambda: WeGenMLLMEncode().encode(model, "a fox", max_new_tokens=8),
           "understand": lambda: WeGenUnderstand().understand(model, image(), "What?", max_new_tokens=50),
           "reconstruct": lambda: WeGenReconstruct().reconstruct(model, image(), seed=0, **{**SMALL, "steps": 20})}
    try:
        with pytest.raises(InterruptProcessingException):
            run[stage]()
    finally:
        hook.remove()
    assert len(comfy_host.updates) == 3 and comfy_host.updates_after_interrupt == 0
    assert len(calls) <= 3 + 2  # prefill (tokens) + the 3 reported steps + the one running at the interrupt


def test_interrupt_before_a_stage_starts(comfy_host, model, cond):
    comfy_host.interrupted = True
    with pytest.raises(InterruptProcessingException):
        WeGenConsistencyDecode().decode(model, cond, seed=0, **SMALL)
    assert comfy_host.updates == []


# Memory management ----------------------------------------------------------------------------------

def test_stages_load_their_modules_through_comfy(comfy_host, cond, engine):
    model = WeGenLoader().load("tiny", "fp32", "gpu")[0]  # "gpu" policy: managed by ModelPatcher
    WeGenConsistencyDecode().decode(model, cond, seed=0, **SMALL)
    WeGenUnderstand().understand(model, image(), "What?", max_new_tokens=2)
    (decode_patchers, decode_kw), (understand_patchers, understand_kw) = comfy_host.loads
    assert [p.model.inner for p in decode_patchers] == [engine.unet, engine.vae]
    assert [p.model.inner for p in understand_patchers] == [engine.eva, engine.mllm]
    assert decode_kw["force_full_load"] and understand_kw["force_full_load"]
    assert str(decode_patchers[0].load_device) == "cpu" and str(decode_patchers[0].offload_device) == "cpu"
    detached = [p.detached for p in decode_patchers + understand_patchers]  # patchers live as long as the engine
    comfy_host.modules["comfy.model_management"].unload_all_models()  # the "Unload models" button
    assert [p.detached for p in decode_patchers + understand_patchers] == [n + 1 for n in detached]
    WeGenConsistencyDecode().decode(model, cond, seed=0, **SMALL)  # loads again, same patchers
    assert comfy_host.loads[-1][0] == decode_patchers


def test_cpu_policy_bypasses_memory_management(comfy_host, model, cond):
    WeGenConsistencyDecode().decode(model, cond, seed=0, **SMALL)
    assert comfy_host.loads == [] and comfy_host.frees == []


def test_placement_per_policy():
    gpu = type("Host", (), {"mm": type("MM", (), {"get_torch_device": staticmethod(lambda: "cuda:0")}),
                            "model_patcher": object()})()
    assert host.placement("gpu", gpu) == ("cuda:0", "none", True)
    assert host.placement("offload when idle", gpu) == ("cuda:0", "idle", False)
    assert host.placement("cpu", gpu) == ("cpu", "none", False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert host.placement("gpu", None) == (device, "none", False)
    assert host.placement("offload when idle", None) == (device, "idle" if device == "cuda" else "none", False)
    with pytest.raises(ValueError, match="device must be one of"):
        host.placement("fast", None)


def test_out_of_memory_names_the_offload_setting(comfy_host, model):
    engine = host.load_engine(model)
    with pytest.raises(torch.OutOfMemoryError, match="offload when idle"):
        with host.stage(model, engine, "unet"):
            raise torch.OutOfMemoryError("CUDA out of memory")


# Without ComfyUI ----------------------------------------------------------------------------------

def test_plain_behaviour_without_comfyui(monkeypatch, tmp_path, tiny_ckpt, cond):
    import os

    (tmp_path / "models" / "wegen").mkdir(parents=True)
    os.symlink(tiny_ckpt, tmp_path / "models" / "wegen" / "mine")
    monkeypatch.chdir(tmp_path)
    assert host.comfy() is None
    assert "mine" in WeGenLoader.INPUT_TYPES()["required"]["checkpoint"][0]
    model = WeGenLoader().load("mine", "fp32", "cpu")[0]
    out = WeGenConsistencyDecode().decode(model, cond, seed=0, **SMALL)[0]
    check_image(out, 1, 64, 64)
    progress = host.Progress(host.comfy())
    progress({"stage": "denoise", "i": 1, "total": 1, "x": None})  # no bar, no host: nothing to do
    assert progress.steps == 1
    host.show_text("1", "hello")  # no server: nothing happens


def test_latent_preview_picture():
    x = torch.randn(2, 4, 12, 10)
    picture = host.latent_rgb(x)
    assert picture.size == (10, 12) and picture.mode == "RGB"
    assert host.latent_rgb(torch.randn(1, 16, 6, 6)).size == (6, 6)  # non-SDXL latents: channels 0..2


@pytest.mark.integration
def test_pack_imports_the_way_comfyui_loads_it(tmp_path):
    """ComfyUI imports the pack under its absolute path as module name: relative imports only, nothing heavy."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (
        "import importlib.util, os, sys\n"
        "root = sys.argv[1]\n"
        "name = root.replace('.', '_x_')\n"
        "spec = importlib.util.spec_from_file_location(name, os.path.join(root, '__init__.py'),\n"
        "                                              submodule_search_locations=[root])\n"
        "pack = importlib.util.module_from_spec(spec)\n"
        "sys.modules[name] = pack\n"
        "spec.loader.exec_module(pack)\n"
        "assert not {'torch', 'transformers', 'diffusers'} & set(sys.modules), 'heavy import at pack import'\n"
        "assert sys.modules[name + '.nodes.host'].bundled_checkpoints()  # reaches the engine's loading module\n"
        "assert name + '.wegen.loading' in sys.modules, 'the pack reaches its own engine copy'\n"
        "assert 'wegen' not in sys.modules and 'nodes' not in sys.modules\n"
        "print(','.join(sorted(pack.NODE_CLASS_MAPPINGS)), pack.WEB_DIRECTORY)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script, root], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert set(NODE_CLASS_MAPPINGS) == set(out.stdout.split()[0].split(","))


def test_the_import_graph_is_honest():
    """nodes/ reach the engine by relative imports (no module look-ups by name); wegen/ never imports the nodes
    (inside ComfyUI a top-level `nodes` is ComfyUI's own nodes.py) nor reaches above its package."""
    import ast
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(os.path.join(root, "nodes", "*.py")):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
                assert node.args and isinstance(node.args[0], ast.Constant), f"{path}: a module name built at run time"
                assert "wegen" not in node.args[0].value and "." != node.args[0].value[:1], path
    for path in glob.glob(os.path.join(root, "wegen", "**", "*.py"), recursive=True):
        depth = os.path.relpath(path, root).count(os.sep)  # wegen/x.py: 1, wegen/train/x.py: 2
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                assert node.level <= depth, f"{path}: a relative import above wegen/"
                names = [node.module or ""] if node.level == 0 else []
            assert not [n for n in names if n == "nodes" or n.startswith("nodes.")], f"{path} imports the nodes"


# The checkpoint's recommended settings (0 / -1 / "checkpoint" widget values) ------------------------------

def test_decode_widget_defaults_leave_the_settings_to_the_checkpoint():
    from ComfyUI_WeGen.nodes.chat import WeGenChatTurn
    from ComfyUI_WeGen.nodes.sweep import WeGenDiversitySweep

    for cls in (WeGenConsistencyDecode, WeGenReconstruct, WeGenChatTurn, WeGenDiversitySweep):
        req = cls.INPUT_TYPES()["required"]
        assert [req[k][1]["default"] for k in ("steps", "cfg", "width", "height")] == [0, -1.0, 0, 0], cls
        assert [req[k][1]["min"] for k in ("steps", "cfg", "width", "height")] == [0, -1.0, 0, 0], cls
        for k in ("steps", "cfg", "width", "height"):
            assert "checkpoint's recommendation" in req[k][1]["tooltip"], (cls, k)
        assert "recommend" in cls.DESCRIPTION
    choices, opts = WeGenMLLMEncode.INPUT_TYPES()["required"]["feature_slice"]
    assert choices[:2] == ["official", "aligned"] and opts["default"] == "checkpoint"  # saved values stay valid


def test_release_settings_for_a_checkpoint_without_a_recommendation(engine):
    from ComfyUI_WeGen.nodes import convert

    size = engine.decoder_cfg.default_size
    assert convert.decode_settings(engine, 0, -1.0, 0, 0) == {"steps": 50, "cfg": 2.0, "width": size, "height": size}
    assert convert.decode_settings(engine, 3, 0.0, 64, 128) == {"steps": 3, "cfg": 0.0, "width": 64, "height": 128}
    assert convert.feature_slice(engine, "checkpoint") == "official"
    assert convert.feature_slice(engine, "aligned") == "aligned"


@pytest.fixture
def toy(comfy_host):
    return WeGenLoader().load("wegen-toy", "fp32", "cpu")[0]


def test_toy_defaults_follow_its_recommendation(comfy_host, toy):
    from ComfyUI_WeGen.wegen.loading import recommended_settings

    rec = recommended_settings("wegen-toy")
    assert host.load_engine(toy).recommended == rec
    text = "a large red circle at the top left on a white background"
    cond = WeGenMLLMEncode().encode(toy, text)[0]  # feature_slice left to the checkpoint
    explicit = WeGenMLLMEncode().encode(toy, text, feature_slice=rec["feature_slice"])[0]
    assert torch.equal(cond.features, explicit.features)
    comfy_host.updates.clear()
    out = WeGenConsistencyDecode().decode(toy, cond, seed=1, steps=0, cfg=-1.0, width=0, height=0)[0]
    assert len(comfy_host.updates) == rec["steps"]
    check_image(out, 1, rec["height"], rec["width"])
    explicit = WeGenConsistencyDecode().decode(toy, cond, seed=1, steps=rec["steps"], cfg=rec["cfg"],
                                               width=rec["width"], height=rec["height"])[0]
    assert torch.equal(out, explicit)
    out = WeGenReconstruct().reconstruct(toy, out, seed=1, steps=2, cfg=-1.0, width=0, height=0)[0]
    check_image(out, 1, rec["height"], rec["width"])


def test_chat_turn_and_sweep_use_the_recommended_feature_slice(comfy_host, toy):
    from ComfyUI_WeGen.nodes.chat import WeGenChatMemory, WeGenChatTurn
    from ComfyUI_WeGen.nodes.sweep import WeGenDiversitySweep
    from ComfyUI_WeGen.wegen import sessions
    from ComfyUI_WeGen.wegen.loading import recommended_settings

    rec = recommended_settings("wegen-toy")
    (chat,) = WeGenChatMemory().open("toy", "reset")
    WeGenChatTurn().turn(toy, chat, "a small blue square at the center on a gray background", 42, 2, -1.0, 0, 0)
    (turn,) = sessions.load_session(chat.root, "toy").turns
    assert {k: turn.settings[k] for k in ("steps", "cfg", "width", "height", "feature_slice")} == \
           {**rec, "steps": 2}
    out = WeGenDiversitySweep().sweep([toy], ["a red circle"], [42], [1], [2], [-1.0], [0], [0], [4096], [16],
                                      ["wegen/sweeps/toy"])
    assert tuple(out["result"][0].shape) == (1, rec["height"], rec["width"], 3)
    folder = os.path.join(host.output_directory(), out["ui"]["wegen_sweep"][0]["subfolder"])
    with open(os.path.join(folder, "sweep.json"), encoding="utf-8") as f:
        settings = json.load(f)["settings"]
    assert (settings["feature_slice"], settings["cfg"], settings["width"]) == (rec["feature_slice"], rec["cfg"],
                                                                              rec["width"])
