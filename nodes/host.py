"""ComfyUI host glue: the only module of the pack that touches ComfyUI (folder_paths, comfy.*, server,
latent_preview). Follows shared/reference/comfyui-host-contract.md sections 1.7-1.9:

  * the `wegen` model folder (registered at import, extendable through extra_model_paths.yaml);
  * the WEGEN_MODEL handle -> a cached WeGenEngine placed by the loader's device policy;
  * `stage(...)`: the engine's torch modules under ComfyUI's memory management (ModelPatcher +
    load_models_gpu, so "Unload models" and other models' eviction free WeGen's memory);
  * `Progress`: the engine callback -> ProgressBar over decode tokens and denoise steps, an interrupt
    check every step, a latent preview every few denoise steps.

ComfyUI modules are imported on every call (never cached at import), so the same code runs inside
ComfyUI, under the tests' stand-in modules, and with no ComfyUI at all, where everything degrades to
plain behaviour: checkpoints under ./models/wegen, the engine on the CPU (or CUDA), no progress bar.
The engine is reached with relative imports (`from ..wegen import engine`: the pack's own copy, whatever
name ComfyUI imported the pack under), inside the functions that need it, so the pack imports no torch.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace

from ..wegen import rules

log = logging.getLogger(__name__)

MODEL_FOLDER = "wegen"  # folder_paths key and models/<folder>
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICE_POLICIES = ("gpu", "offload when idle", "cpu")
PRESETS = rules.PRESETS
OFFLOAD_MODES = ("auto", *rules.OFFLOAD_MODES)  # auto: as the device policy says
WEIGHT_DTYPES = rules.WEIGHT_DTYPES
PREVIEW_EVERY = 2  # denoise steps between latent previews
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SDXL latent -> RGB approximation (published linear factors for the SDXL VAE's 4 latent channels).
SDXL_LATENT_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                   (-0.3165, -0.2492, -0.6262))
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


# Finding ComfyUI ---------------------------------------------------------------------------------

def comfy():
    """The ComfyUI modules this pack uses, or None outside ComfyUI (no importable folder_paths). A module this
    host lacks (an older ComfyUI, the tests' stand-ins) is None."""
    try:
        import folder_paths
    except ImportError:
        return None
    host = SimpleNamespace(folder_paths=folder_paths, mm=None, utils=None, model_patcher=None,
                           patcher_extension=None, server=None, latent_preview=None)
    with contextlib.suppress(ImportError):
        import comfy.model_management as mm
        host.mm = mm
    with contextlib.suppress(ImportError):
        import comfy.utils as utils
        host.utils = utils
    with contextlib.suppress(ImportError):
        import comfy.model_patcher as model_patcher
        host.model_patcher = model_patcher
    with contextlib.suppress(ImportError):
        import comfy.patcher_extension as patcher_extension
        host.patcher_extension = patcher_extension
    with contextlib.suppress(ImportError):
        import server
        host.server = server
    with contextlib.suppress(ImportError):
        import latent_preview
        host.latent_preview = latent_preview
    return host


# Model folders -------------------------------------------------------------------------------------

def register_model_folder(folder_paths) -> None:
    """models/wegen as a ComfyUI model folder (extra_model_paths.yaml may already list more)."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def model_folders() -> list[str]:
    """Folders whose subfolders are WeGen checkpoints, in search order."""
    host = comfy()
    if host is not None:
        register_model_folder(host.folder_paths)
        return host.folder_paths.get_folder_paths(MODEL_FOLDER)
    folders = [os.path.join(os.getcwd(), "models", MODEL_FOLDER), os.path.join(PACK_ROOT, "models", MODEL_FOLDER)]
    return list(dict.fromkeys(os.path.abspath(f) for f in folders))


def bundled_checkpoints() -> dict:
    """{name: folder} of the checkpoints shipped inside the pack (checkpoints/<name>, e.g. wegen-toy)."""
    from ..wegen.loading import bundled_checkpoints as bundled

    return bundled()


def list_checkpoints() -> list[str]:
    """The Loader's choices: the pack's bundled checkpoints first (no setup needed), then the sorted names of the
    subfolders of the model folders that hold either checkpoint layout (a few stats each). A model-folder
    checkpoint named like a bundled one is listed once, and find_checkpoint gives the model folder's."""
    from ..wegen.loading import CheckpointError, resolve_checkpoint

    bundled = list(bundled_checkpoints())
    names = []
    for folder in model_folders():
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            try:
                resolve_checkpoint(os.path.join(folder, name))
            except (CheckpointError, OSError):
                continue
            names.append(name)
    return bundled + sorted(set(names) - set(bundled))


def find_checkpoint(name: str) -> str:
    """A checkpoint name from the loader's list (or, for headless runs, a folder path) -> its folder.

    Names are looked up in the model folders first (so a models/wegen/<name> folder replaces a bundled checkpoint
    of the same name), then among the pack's bundled checkpoints."""
    from ..wegen.loading import resolve_checkpoint

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"checkpoint must be the name of a folder under models/{MODEL_FOLDER}/ or of a bundled "
                         f"checkpoint, got {name!r}")
    if os.path.isabs(os.path.expanduser(name)):
        resolve_checkpoint(name)  # names the missing files
        return os.path.abspath(os.path.expanduser(name))
    folders = model_folders()
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            resolve_checkpoint(path)
            return path
    bundled = bundled_checkpoints()
    if name in bundled:
        return bundled[name]
    raise FileNotFoundError(f"checkpoint {name!r} not found in the WeGen model folders {folders} nor among the "
                            f"bundled checkpoints ({', '.join(bundled) or 'none'}); put a checkpoint folder (the "
                            f"official wegen_mllm_ckpt/ layout or a `python -m wegen convert` folder) there, or run "
                            f"`python -m wegen make-tiny {os.path.join(folders[0], 'tiny')}`")


# The WEGEN_MODEL handle ------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeGenModel:
    """What a WEGEN_MODEL link carries: where the checkpoint is and how to place it; resolves to a cached engine."""

    checkpoint: str  # absolute folder path
    dtype: str = "auto"  # one of DTYPES
    device: str = "gpu"  # one of DEVICE_POLICIES
    preset: str = "comfyui"  # one of PRESETS
    offload: str = "auto"  # one of OFFLOAD_MODES
    weight_dtype: str = "default"  # one of WEIGHT_DTYPES

    def __str__(self):
        extra = "".join(f", {v}" for v, d in ((self.preset, "comfyui"), (self.offload, "auto"),
                                             (self.weight_dtype, "default")) if v != d)
        return f"WeGen {os.path.basename(self.checkpoint)} ({self.dtype}, {self.device}{extra})"


def check_handle(model) -> WeGenModel:
    if not isinstance(model, WeGenModel):
        raise ValueError(f"model must be a WEGEN_MODEL from a WeGen Loader node, got {type(model).__name__}")
    return model


def placement(policy: str, host=None, offload: str = "auto") -> tuple[str, str, bool]:
    """Device policy (+ the loader's offload choice) -> (engine device, engine offload, managed by ComfyUI's
    ModelPatcher). An offload other than auto/none: the engine moves its modules itself."""
    if policy not in DEVICE_POLICIES:
        raise ValueError(f"device must be one of {list(DEVICE_POLICIES)}, got {policy!r}")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {list(OFFLOAD_MODES)}, got {offload!r}")
    if policy == "cpu":
        return "cpu", "none", False
    if offload not in ("auto", "none"):
        return _gpu_device(host), offload, False
    device = _gpu_device(host)
    if policy == "offload when idle" and offload == "auto":
        return device, ("none" if device == "cpu" else "idle"), False
    return device, "none", host is not None and host.mm is not None and host.model_patcher is not None


def _gpu_device(host) -> str:
    if host is not None and host.mm is not None:
        return str(host.mm.get_torch_device())
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_LOADED: set = set()  # placements already loaded once (ComfyUI frees room before the first load only)


def load_engine(model: WeGenModel):
    """WEGEN_MODEL -> the cached WeGenEngine for its checkpoint, dtype and placement."""
    import torch

    from ..wegen import engine as engine_api

    model = check_handle(model)
    host = comfy()
    device, offload, _ = placement(model.device, host, model.offload)
    resolved = engine_api.resolve_dtype(model.dtype, torch.device(device), model.preset)
    dtype = next(name for name, d in engine_api.DTYPES.items() if d == resolved)  # "auto" shares its twin's engine
    key = (os.path.realpath(model.checkpoint), dtype, device, offload, model.preset, model.weight_dtype)
    if host is not None and host.mm is not None and device != "cpu" and key not in _LOADED:
        host.mm.free_memory(_folder_bytes(model.checkpoint), torch.device(device))
    engine = engine_api.WeGenEngine.load(model.checkpoint, dtype=dtype, device=device, offload=offload,
                                         preset=model.preset, weight_dtype=model.weight_dtype)
    _LOADED.add(key)
    return engine


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


# Memory management -----------------------------------------------------------------------------------

_PATCHERS: dict = {}  # (id(engine), module name) -> ModelPatcher


@functools.lru_cache(maxsize=None)
def _holder_class(name: str):
    """nn.Module class holding one engine module for ModelPatcher, which sets `.device` on what it holds
    (diffusers' read-only property would refuse). Named WeGen_<name> so ComfyUI's log says what it loads."""
    import torch

    def __init__(self, inner: torch.nn.Module):
        torch.nn.Module.__init__(self)
        self.inner = inner

    return type(f"WeGen_{name}", (torch.nn.Module,), {"__init__": __init__})


def patcher(engine, name: str, host=None):
    """The ModelPatcher of engine.<name> ("mllm", "unet", "vae", "eva"), made once per engine."""
    host = host or comfy()
    key = (id(engine), name)
    if key not in _PATCHERS:
        import torch

        module = getattr(engine, name)  # engine.eva is built on first use
        p = host.model_patcher.ModelPatcher(_holder_class(name)(module), load_device=torch.device(engine.device),
                                            offload_device=host.mm.unet_offload_device())
        callbacks = getattr(host.patcher_extension, "CallbacksMP", None)
        if callbacks is not None and hasattr(p, "add_callback"):
            p.add_callback(callbacks.ON_DETACH, functools.partial(release_device_state, engine, name))
        _PATCHERS[key] = p
    return _PATCHERS[key]


def release_device_state(engine, name, patcher=None, unpatch_all=True):
    """ComfyUI moved engine.<name> off the GPU ("Unload models", eviction; a ModelPatcher ON_DETACH callback):
    the engine frees what it keeps on the device for that module besides the weights (engine.release)."""
    engine.release(name)


@contextlib.contextmanager
def stage(model: WeGenModel, engine, *names: str):
    """engine.<names> ready on the compute device for one stage; yields the engine callback (a Progress).

    ComfyUI + "gpu": ModelPatcher + load_models_gpu(force_full_load=True), so ComfyUI evicts other models
    for them and "Unload models" moves them off. "offload when idle": ComfyUI frees room, the engine moves
    the modules in and out itself. Without ComfyUI, or on "cpu": nothing to do.
    """
    host = comfy()
    device, offload, managed = placement(model.device, host, model.offload)
    if host is not None and host.mm is not None:
        host.mm.throw_exception_if_processing_interrupted()
        if managed:
            host.mm.load_models_gpu([patcher(engine, n, host) for n in names], force_full_load=True)
        elif offload in ("idle", "phase"):  # sequential holds one block at a time: nothing to make room for
            import torch

            need = sum(host.mm.module_size(getattr(engine, n)) for n in names)
            host.mm.free_memory(need, torch.device(device))
    progress = Progress(host)
    try:
        yield progress
        progress.finish()
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":
            raise type(e)(f"{e}\nWeGen ran out of memory on {device}: set the WeGen Loader's device to "
                          f"'offload when idle' (modules leave the GPU between stages) or 'cpu', or lower "
                          f"width/height") from e
        raise
    finally:
        if host is not None and host.mm is not None and offload != "none":
            host.mm.soft_empty_cache()


# Progress, interrupts, previews ----------------------------------------------------------------------

class Progress:
    """The engine's per-step callback: interrupt check, ProgressBar per stage, latent preview every few steps."""

    def __init__(self, host=None):
        self.host = host if host is not None else comfy()
        self.stage = None
        self.bar = None
        self.steps = 0  # callbacks seen (tests count them)
        self.previews = _previews_enabled(self.host)

    def __call__(self, info: dict) -> None:
        self.steps += 1
        host = self.host
        if host is None:
            return
        if host.mm is not None:
            host.mm.throw_exception_if_processing_interrupted()
        if host.utils is None:
            return
        if info["stage"] != self.stage or self.bar is None:
            self.stage, self.bar = info["stage"], host.utils.ProgressBar(info["total"])
        preview = None
        x = info.get("x")
        if self.previews and x is not None and (info["i"] % PREVIEW_EVERY == 0 or info["i"] == info["total"]):
            preview = ("JPEG", latent_rgb(x), _preview_size(host))
        self.bar.update_absolute(info["i"], info["total"], preview)

    def finish(self) -> None:
        """Fill the bar: a decode may end before its upper bound (EOS, or </img> needs no callback)."""
        if self.bar is not None and self.bar.current < self.bar.total:
            self.bar.update_absolute(self.bar.total, self.bar.total)


def _previews_enabled(host) -> bool:
    """ComfyUI's live-preview setting (--preview-method or the UI's choice); 'none' turns previews off."""
    if host is None or host.latent_preview is None or host.utils is None:
        return False
    args = getattr(host.latent_preview, "args", None)
    method = getattr(args, "preview_method", "none")
    return str(getattr(method, "value", method)) != "none"


def _preview_size(host) -> int | None:
    return getattr(host.latent_preview, "MAX_PREVIEW_RESOLUTION", None)


def latent_rgb(x):
    """(B, C, h, w) latents -> PIL RGB preview of row 0 (SDXL factors for 4 channels, else channels 0..2)."""
    import numpy as np
    import torch
    from PIL import Image

    lat = x[0].detach().float().cpu()  # (C, h, w)
    if lat.shape[0] == len(SDXL_LATENT_RGB):
        rgb = torch.einsum("chw,cr->hwr", lat, torch.tensor(SDXL_LATENT_RGB)) + torch.tensor(SDXL_LATENT_RGB_BIAS)
    else:  # not an SDXL-style VAE: show channels 0, 1, 2 (repeated when fewer)
        rgb = lat[[k % lat.shape[0] for k in range(3)]].permute(1, 2, 0)  # (h, w, 3)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()  # (h, w, 3)
    return Image.fromarray(np.ascontiguousarray(pixels))


def show_text(node_id, text: str) -> None:
    """Text shown on the node in the ComfyUI frontend (no-op without ComfyUI or a node id)."""
    host = comfy()
    server = getattr(getattr(host, "server", None), "PromptServer", None)
    instance = getattr(server, "instance", None)
    if node_id is None or instance is None or not hasattr(instance, "send_progress_text"):
        return
    instance.send_progress_text(text, node_id)


# Output folder and server routes -----------------------------------------------------------------------

_OUTPUT_DIRS: list = []  # headless runs without ComfyUI: where outputs go (innermost last)


def output_directory() -> str:
    """ComfyUI's output folder; without ComfyUI the folder given to output_to(), else ./output."""
    host = comfy()
    if host is not None and hasattr(host.folder_paths, "get_output_directory"):
        return host.folder_paths.get_output_directory()
    return _OUTPUT_DIRS[-1] if _OUTPUT_DIRS else os.path.join(os.getcwd(), "output")


@contextlib.contextmanager
def output_to(folder: str):
    """Headless runs: output_directory() is `folder` inside this block (ComfyUI's own folder wins)."""
    _OUTPUT_DIRS.append(os.path.abspath(folder))
    try:
        yield
    finally:
        _OUTPUT_DIRS.pop()


_ROUTES: set = set()  # (method, path) already registered


def add_route(method: str, path: str, handler) -> bool:
    """An aiohttp handler on ComfyUI's server (paths start with /wegen/); False without a server, or twice."""
    if not path.startswith("/wegen/"):
        raise ValueError(f"pack routes start with /wegen/, got {path!r}")
    server = getattr(getattr(comfy(), "server", None), "PromptServer", None)
    routes = getattr(getattr(server, "instance", None), "routes", None)
    register = getattr(routes, method.lower(), None)
    if register is None or (method.upper(), path) in _ROUTES:
        return False
    register(path)(handler)
    _ROUTES.add((method.upper(), path))
    return True


# At import: make models/wegen a ComfyUI model folder (cheap; nothing when ComfyUI is absent).
try:
    _host = comfy()
    if _host is not None:
        register_model_folder(_host.folder_paths)
except Exception as _e:  # a broken host must not hide the nodes; model_folders() retries and raises
    log.warning("could not register the %s model folder: %s", MODEL_FOLDER, _e)
