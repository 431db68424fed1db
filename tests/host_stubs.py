"""pytest plugin (tests/conftest.py: pytest_plugins): the pack loaded the way ComfyUI loads it, and a stand-in
ComfyUI host for node tests.

The pack: ComfyUI imports a custom node folder as a package from its __init__.py, under a name of its own
(`spec_from_file_location(name, <folder>/__init__.py)`, submodules searched in the folder); so does this plugin,
under demo.PACK_NAME (ComfyUI_WeGen). Node tests import the nodes from it
(`from ComfyUI_WeGen.nodes import host`), never a top-level `nodes`, so the nodes' relative imports reach the
pack's own engine copy (`ComfyUI_WeGen.wegen`); engine tests keep `import wegen`. Objects of the two copies are
not interchangeable: node tests get their engine from the `pack_engine` fixture (the nodes' loader caches it).

The host: folder_paths, comfy.utils.ProgressBar, comfy.model_management, comfy.model_patcher,
comfy.patcher_extension, server.PromptServer, latent_preview. They mirror the parts of ComfyUI 0.8 the pack calls
(shared/reference/comfyui-host-contract.md 1.7-1.10), and record what the pack did so tests can check it. The
`comfy_host` fixture (or `install(monkeypatch, models_dir)`) puts them into sys.modules for one test only
(monkeypatch undoes it), so engine tests never see them.
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from demo import load_pack  # noqa: E402  (the pack as ComfyUI imports it: one loader for demo and tests)


def pytest_configure(config):
    load_pack()  # before test modules are collected: they import from it


@pytest.fixture(scope="session")
def pack_engine(tiny_ckpt):
    """The float32 CPU engine on the tiny checkpoint, from the pack's own copy (what the nodes load)."""
    from ComfyUI_WeGen.wegen.engine import WeGenEngine

    return WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu")


@pytest.fixture
def model(comfy_host):
    """A WEGEN_MODEL handle to the tiny checkpoint on the CPU, from the pack's Loader (node tests)."""
    from ComfyUI_WeGen.nodes.loader import WeGenLoader

    return WeGenLoader().load("tiny", "fp32", "cpu")[0]


@pytest.fixture(scope="module")
def cond(pack_engine):
    """A WEGEN_CONDITION from the pack's engine (node tests)."""
    return pack_engine.encode("a red fox in the snow", max_new_tokens=8)


class InterruptProcessingException(Exception):
    pass


@dataclass
class StubHost:
    """What the pack did to the host, plus knobs a test turns."""

    models_dir: str
    updates: list = field(default_factory=list)  # (value, total, preview) of every ProgressBar update
    bars: list = field(default_factory=list)  # totals of the ProgressBars created
    loads: list = field(default_factory=list)  # (patchers, kwargs) of every load_models_gpu call
    frees: list = field(default_factory=list)  # (bytes, device) of every free_memory call
    texts: list = field(default_factory=list)  # (node_id, text) shown on nodes
    loaded: list = field(default_factory=list)  # patchers currently "on the GPU"
    patchers: list = field(default_factory=list)  # every ModelPatcher made
    interrupted: bool = False
    interrupt_at_update: int | None = None  # set the interrupt flag when this many updates were made
    interrupt_checks: int = 0
    updates_after_interrupt: int = 0
    preview_method: str = "auto"


def _folder_paths(host: StubHost):
    m = types.ModuleType("folder_paths")
    m.models_dir = host.models_dir
    m.folder_names_and_paths = {}

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        paths, _ = m.folder_names_and_paths.setdefault(folder_name, ([], set()))
        if full_folder_path not in paths:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)

    def get_folder_paths(folder_name):
        return list(m.folder_names_and_paths[folder_name][0])

    m.add_model_folder_path = add_model_folder_path
    m.get_folder_paths = get_folder_paths
    m.get_output_directory = lambda: os.path.join(host.models_dir, "..", "output")
    m.get_temp_directory = lambda: os.path.join(host.models_dir, "..", "temp")
    m.get_input_directory = lambda: os.path.join(host.models_dir, "..", "input")
    return m


def _model_management(host: StubHost):
    import torch

    m = types.ModuleType("comfy.model_management")
    m.InterruptProcessingException = InterruptProcessingException
    m.get_torch_device = lambda: torch.device("cpu")
    m.unet_offload_device = lambda: torch.device("cpu")
    m.intermediate_device = lambda: torch.device("cpu")
    m.module_size = lambda module: sum(t.nelement() * t.element_size() for t in module.state_dict().values())

    def throw_exception_if_processing_interrupted():
        host.interrupt_checks += 1
        if host.interrupted:
            host.interrupted = False
            raise InterruptProcessingException()

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        host.loads.append((list(models), dict(force_full_load=force_full_load)))
        for p in models:
            p.patch_model(p.load_device)
            if p not in host.loaded:
                host.loaded.append(p)

    def unload_all_models():
        for p in host.loaded:
            p.detach()
        host.loaded.clear()

    m.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    m.processing_interrupted = lambda: host.interrupted
    m.load_models_gpu = load_models_gpu
    m.unload_all_models = unload_all_models
    m.free_memory = lambda memory_required, device, keep_loaded=(): host.frees.append((memory_required, device))
    m.soft_empty_cache = lambda force=False: None
    return m


def _model_patcher(host: StubHost):
    m = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.detached = 0
            self.callbacks = {}
            host.patchers.append(self)

        def add_callback(self, call_type, callback):
            self.callbacks.setdefault(call_type, []).append(callback)

        def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
            self.model.to(device_to or self.load_device)
            return self.model

        def detach(self, unpatch_all=True):
            self.detached += 1
            self.model.to(self.offload_device)
            for callback in self.callbacks.get("on_detach_after", []):
                callback(self, unpatch_all)
            return self.model

    m.ModelPatcher = ModelPatcher
    return m


def _patcher_extension():
    m = types.ModuleType("comfy.patcher_extension")
    m.CallbacksMP = types.SimpleNamespace(ON_DETACH="on_detach_after")
    return m


def _utils(host: StubHost):
    m = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.node_id = total, 0, node_id
            host.bars.append(total)

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            host.updates.append((self.current, self.total, preview))
            if host.interrupted:
                host.updates_after_interrupt += 1
            if host.interrupt_at_update is not None and len(host.updates) == host.interrupt_at_update:
                host.interrupted = True  # the user presses Cancel while this step's work is running

        def update(self, value):
            self.update_absolute(self.current + value)

    m.ProgressBar = ProgressBar
    return m


def _server(host: StubHost):
    m = types.ModuleType("server")

    class RouteTable:
        def __init__(self):
            self.routes = []

        def _add(self, method, path):
            def register(handler):
                self.routes.append((method, path, handler))
                return handler
            return register

        def get(self, path):
            return self._add("GET", path)

        def post(self, path):
            return self._add("POST", path)

    class PromptServer:
        instance = None

        def __init__(self):
            self.routes = RouteTable()
            self.client_id = "stub-client"
            self.messages = []

        def send_sync(self, event, data, sid=None):
            self.messages.append((event, data, sid))

        def send_progress_text(self, text, node_id, sid=None):
            host.texts.append((node_id, text))

    PromptServer.instance = PromptServer()
    m.PromptServer = PromptServer
    return m


def _latent_preview(host: StubHost):
    m = types.ModuleType("latent_preview")

    class Method:
        def __init__(self, value):
            self.value = value

    m.args = types.SimpleNamespace(preview_method=Method(host.preview_method))
    m.MAX_PREVIEW_RESOLUTION = 512
    return m


def install(monkeypatch, models_dir: str, **knobs) -> StubHost:
    """Put the stand-in host modules into sys.modules (undone by monkeypatch); returns the record."""
    host = StubHost(models_dir=models_dir, **knobs)
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package
    modules = {"folder_paths": _folder_paths(host), "comfy": comfy,
               "comfy.model_management": _model_management(host), "comfy.model_patcher": _model_patcher(host),
               "comfy.patcher_extension": _patcher_extension(),
               "comfy.utils": _utils(host), "server": _server(host), "latent_preview": _latent_preview(host)}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            monkeypatch.setattr(comfy, name.split(".")[1], module, raising=False)
    host.modules = modules
    return host


@pytest.fixture
def comfy_host(monkeypatch, tiny_ckpt):
    """Stand-in ComfyUI whose models dir holds wegen/tiny (-> the session's tiny checkpoint)."""
    root = os.path.dirname(os.path.dirname(tiny_ckpt))  # <tmp>/ckptN/tiny -> <tmp>
    models_dir = os.path.join(root, "comfy_models")
    wegen_dir = os.path.join(models_dir, "wegen")
    os.makedirs(wegen_dir, exist_ok=True)
    link = os.path.join(wegen_dir, "tiny")
    if not os.path.exists(link):
        os.symlink(tiny_ckpt, link)
    return install(monkeypatch, models_dir)


# Node test inputs (tests/test_nodes*.py) ---------------------------------------------------------------

SMALL = dict(steps=2, cfg=2.0, width=64, height=64)


def image(B=1, H=64, W=64, seed=0):
    import torch

    return torch.rand(B, H, W, 3, generator=torch.Generator().manual_seed(seed))


def check_image(out, B, H, W):
    import torch

    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert tuple(out.shape) == (B, H, W, 3)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def center_mask(B=1, H=64, W=64):
    import torch

    mask = torch.zeros(B, H, W)
    mask[:, H // 4:3 * H // 4, W // 4:3 * W // 4] = 1.0
    return mask
