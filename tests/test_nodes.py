"""Node contract tests under stand-in ComfyUI modules (tests/host_stubs.py) for the whole pack: declarations,
progress, previews, interrupts, memory management, the import graph, checkpoint recommendations. One node's own
tests live in tests/test_nodes_<node file>.py. Tiny checkpoint, 64 px, 2-3 steps."""
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

from host_stubs import SMALL, InterruptProcessingException, check_image, image

WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="session")
def engine(pack_engine):
    """The nodes' copy of the engine (ComfyUI_WeGen.wegen): the one their loader caches."""
    return pack_engine


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
