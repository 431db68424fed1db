"""Checkpoint sanity before anything is allocated: config bounds, sidecar, weight shapes, memory.

Every size a config can set is checked against bounds before a module is built (a Llama config with
10**6 layers, or a scheduler with 10**10 train timesteps, would otherwise build for minutes or allocate
tens of GB); the memory the modules need is estimated from the configs by building them on the meta
device and refused when the machine does not have it. Every failure is one line naming the file and
the field: a CheckpointError (a ValueError, so the CLI prints it and exits 2).
"""
from __future__ import annotations

import logging
import math
import os

# Bounds: far beyond any released model of this kind, far below what would hang a machine.
MAX_LAYERS = 512
MAX_WIDTH = 65536
MAX_VOCAB = 1 << 20
MAX_CONTEXT = 1 << 20
MAX_TIMESTEPS = 100_000
MAX_BLOCKS = 8
MAX_BLOCK_LAYERS = 64
MAX_CHANNELS = 64
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
DIFFUSERS_ACTS = ("swish", "silu", "mish", "gelu", "relu")
MAX_ANY_INT = 1 << 31  # any other integer anywhere in a config

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used; the message names the path and the fix."""


def need_file(path: str, what: str = "") -> str:
    """`path` must be a regular file: a folder in its place (or nothing) is an error naming it."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder where the checkpoint needs a file{what}; remove or replace it")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint is incomplete: missing {path}{what}")
    return path


# Values ------------------------------------------------------------------------------------------

def _int(cfg: dict, key: str, where: str, lo: int, hi: int, default=None, required=True):
    value = cfg.get(key, default)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CheckpointError(f"{where}: {key} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _ints(cfg: dict, key: str, where: str, lo: int, hi: int, n: int | None = None, default=None):
    """An integer or a list of integers (one per block when n is given)."""
    value = cfg.get(key, default)
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or (n is not None and isinstance(value, (list, tuple)) and len(items) != n) or any(
            isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi for v in items):
        count = f" ({n} of them, one per block)" if n else ""
        raise CheckpointError(f"{where}: {key} must be an integer in {lo}..{hi} or a list of such{count}, "
                              f"got {value!r}")
    return list(items) if isinstance(value, (list, tuple)) else [value] * (n or 1)


def _number(cfg: dict, key: str, where: str, lo: float, hi: float, default=None, open_low=True):
    value = cfg.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (lo < value if open_low else lo <= value) and value <= hi
    if not ok:
        raise CheckpointError(f"{where}: {key} must be a finite number in {'(' if open_low else '['}{lo:g}, {hi:g}], "
                              f"got {value!r}")
    return value


def _choice(cfg: dict, key: str, where: str, allowed, default=None):
    value = cfg.get(key, default)
    if value not in allowed:
        raise CheckpointError(f"{where}: {key} must be one of {list(allowed)}, got {value!r}")
    return value


def _scan(value, where: str, path: str = ""):
    """No NaN/inf and no absurd integer anywhere in a config (json.load accepts NaN and Infinity)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _scan(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value[:100_000]):
            _scan(v, where, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"{where}: {path} must be a finite number, got {value!r}")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ANY_INT:
        raise CheckpointError(f"{where}: {path} = {value} is out of range (|value| <= 2**31)")


def _dict(cfg, where: str) -> dict:
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: must be a JSON object, got {type(cfg).__name__}")
    _scan(cfg, where)
    return cfg


# Configs -----------------------------------------------------------------------------------------

def check_llama(cfg, where: str) -> dict:
    _dict(cfg, where)
    hidden = _int(cfg, "hidden_size", where, 1, MAX_WIDTH)
    _int(cfg, "intermediate_size", where, 1, 4 * MAX_WIDTH)
    _int(cfg, "num_hidden_layers", where, 1, MAX_LAYERS)
    heads = _int(cfg, "num_attention_heads", where, 1, 1024)
    head_dim = _int(cfg, "head_dim", where, 1, 4096, required=False)
    if head_dim is None and hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    kv = _int(cfg, "num_key_value_heads", where, 1, heads, default=heads)
    if heads % kv:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    _int(cfg, "vocab_size", where, 1, MAX_VOCAB, default=32000)
    _int(cfg, "max_position_embeddings", where, 1, MAX_CONTEXT, default=2048)
    _number(cfg, "rms_norm_eps", where, 0, 1, default=1e-6)
    _number(cfg, "rope_theta", where, 0, 1e12, default=10000.0)
    from transformers.activations import ACT2FN

    _choice(cfg, "hidden_act", where, sorted(ACT2FN), default="silu")
    for key in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise CheckpointError(f"{where}: {key} must be null or an object with rope_type and factor, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise CheckpointError(f"{where}: {key}.rope_type must be one of {list(ROPE_TYPES)}, got {kind!r}")
        if kind != "default":
            _number(rope, "factor", f"{where}: {key}", 1, 1024, open_low=False)
    return cfg


def _blocks(cfg, where: str) -> list[int]:
    channels = _ints(cfg, "block_out_channels", where, 1, 8192)
    if not isinstance(cfg.get("block_out_channels"), (list, tuple)) or len(channels) > MAX_BLOCKS:
        raise CheckpointError(f"{where}: block_out_channels must be a list of 1..{MAX_BLOCKS} integers, "
                              f"got {cfg.get('block_out_channels')!r}")
    for key in ("down_block_types", "up_block_types"):
        types = cfg.get(key)
        if not isinstance(types, (list, tuple)) or len(types) != len(channels) or \
                not all(isinstance(t, str) for t in types):
            raise CheckpointError(f"{where}: {key} must list {len(channels)} block names (one per "
                                  f"block_out_channels entry), got {types!r}")
    groups = _int(cfg, "norm_num_groups", where, 1, 1024, default=32)
    bad = [c for c in channels if c % groups]
    if bad:
        raise CheckpointError(f"{where}: block_out_channels {channels} must be multiples of norm_num_groups {groups}")
    _int(cfg, "in_channels", where, 1, MAX_CHANNELS, default=4)
    _int(cfg, "out_channels", where, 1, MAX_CHANNELS, default=4)
    _choice(cfg, "act_fn", where, DIFFUSERS_ACTS, default="silu")
    return channels


def check_unet(cfg, where: str) -> dict:
    _dict(cfg, where)
    channels = _blocks(cfg, where)
    n = len(channels)
    _ints(cfg, "sample_size", where, 1, 1024, default=64)
    _ints(cfg, "layers_per_block", where, 1, MAX_BLOCK_LAYERS, n, default=2)
    layers = cfg.get("transformer_layers_per_block", 1)
    flat = [x for v in (layers if isinstance(layers, (list, tuple)) else [layers])
            for x in (v if isinstance(v, (list, tuple)) else [v])]
    if not flat or any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_BLOCK_LAYERS for x in flat):
        raise CheckpointError(f"{where}: transformer_layers_per_block must be integers in 1..{MAX_BLOCK_LAYERS}, "
                              f"got {layers!r}")
    key = "num_attention_heads" if cfg.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _ints(cfg, key, where, 1, 1024, n, default=8)
    for c, h in zip(channels, heads):
        if c % h:
            raise CheckpointError(f"{where}: block_out_channels {channels} are not divisible by {key} {heads}")
    _ints(cfg, "cross_attention_dim", where, 1, MAX_WIDTH, n, default=1280)
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim", "encoder_hid_dim"):
        _int(cfg, key, where, 1, MAX_WIDTH * 4, required=False)
    return cfg


def check_vae(cfg, where: str) -> dict:
    _dict(cfg, where)
    _blocks(cfg, where)
    _int(cfg, "latent_channels", where, 1, MAX_CHANNELS, default=4)
    _int(cfg, "layers_per_block", where, 1, MAX_BLOCK_LAYERS, default=1)
    _ints(cfg, "sample_size", where, 1, 8192, default=32)
    _number(cfg, "scaling_factor", where, 0, 1e6, default=0.18215)
    return cfg


def check_scheduler(cfg, where: str) -> dict:
    from .decoder import PREDICTION_TYPES

    _dict(cfg, where)
    steps = _int(cfg, "num_train_timesteps", where, 1, MAX_TIMESTEPS, default=1000)
    start = _number(cfg, "beta_start", where, 0, 1, default=0.0001)
    _number(cfg, "beta_end", where, start, 1, default=0.02, open_low=False)
    _choice(cfg, "beta_schedule", where, BETA_SCHEDULES, default="linear")
    _choice(cfg, "prediction_type", where, PREDICTION_TYPES, default="epsilon")
    _choice(cfg, "timestep_spacing", where, SPACINGS, default="linspace")
    _choice(cfg, "interpolation_type", where, ("linear", "log_linear"), default="linear")
    _int(cfg, "steps_offset", where, 0, steps - 1, default=0)
    betas = cfg.get("trained_betas")
    if betas is not None and (not isinstance(betas, list) or len(betas) != steps or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas)):
        raise CheckpointError(f"{where}: trained_betas must be null or {steps} numbers in (0, 1) "
                              f"(one per num_train_timesteps)")
    return cfg


SIDECAR_BOUNDS = {"n_query_tokens": (1, 1024), "n_gen_tokens": (1, 100), "eva_head_width": (1, 4096),
                  "image_size": (14, 4096)}


def check_sidecar(extra, path: str) -> dict:
    """The sidecar's overrides: an object of known keys with integer values in bounds."""
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: must be a JSON object with keys among {sorted(SIDECAR_BOUNDS)}, "
                              f"got {type(extra).__name__}")
    unknown = set(extra) - set(SIDECAR_BOUNDS)
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(SIDECAR_BOUNDS)}")
    for key in extra:
        _int(extra, key, path, *SIDECAR_BOUNDS[key])
    if "n_query_tokens" in extra and math.isqrt(extra["n_query_tokens"]) ** 2 != extra["n_query_tokens"]:
        raise CheckpointError(f"{path}: n_query_tokens must be a square number (an 8x8 grid is 64), "
                              f"got {extra['n_query_tokens']}")
    return dict(extra)


# Weights -----------------------------------------------------------------------------------------

EVA_KEYS = {"patch_embed.proj.weight": 4, "pos_embed": 3, "cls_token": 3, "blocks.0.mlp.fc1.weight": 2}


def check_eva_state(sd: dict, path: str):
    """The EVA tensors its dimensions are read from: present, of the right rank, a square patch grid."""
    for key, ndim in EVA_KEYS.items():
        if key not in sd:
            raise CheckpointError(f"{path}: EVA tensor {key} is missing")
        if sd[key].ndim != ndim:
            raise CheckpointError(f"{path}: EVA tensor {key} must have {ndim} dimensions, got shape "
                                  f"{tuple(sd[key].shape)}")
    blocks = {k.split(".")[1] for k in sd if k.startswith("blocks.")}
    if not all(b.isdigit() for b in blocks) or len(blocks) > MAX_LAYERS:
        raise CheckpointError(f"{path}: EVA blocks must be blocks.0 .. blocks.N (N < {MAX_LAYERS})")
    n_pos = sd["pos_embed"].shape[1] - 1
    if n_pos < 1 or math.isqrt(n_pos) ** 2 != n_pos:
        raise CheckpointError(f"{path}: EVA pos_embed holds {n_pos} patch positions, not a square grid")


def check_matrix(sd: dict, key: str, path: str):
    if key not in sd or sd[key].ndim != 2 or min(sd[key].shape) < 1:
        shape = tuple(sd[key].shape) if key in sd else "missing"
        raise CheckpointError(f"{path}: {key} must be a 2-D weight, got {shape}")


def check_shapes(module, state: dict, name: str, path: str):
    """Every tensor of `state` the module has must have the shape the module (built from its config) expects."""
    expected = module.state_dict(keep_vars=True)
    for key, tensor in state.items():
        want = expected.get(key)
        if want is not None and tuple(want.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {name} weight {key} has shape {tuple(tensor.shape)} but the config "
                                  f"implies {tuple(want.shape)}; the config and the weights do not belong together")


# Memory ------------------------------------------------------------------------------------------

def machine_memory() -> int | None:
    """Bytes of RAM of this machine (psutil when installed, else sysconf); None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_memory(device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device (torch.cuda.mem_get_info; free counts this process's cached
    blocks as free, since they are reused); None elsewhere."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached), int(total)


def estimate_bytes(parts, dtype) -> dict:
    """{module: bytes} of the parameters and buffers the configs imply, in `dtype` (built on the meta device)."""
    import torch

    from . import loading

    size = torch.empty((), dtype=dtype).element_size()
    modules = {"LLM": loading.build_mllm(parts.mllm_cfg, parts.llama_config),
               "UNet": loading.build_unet(parts.unet_config), "VAE": loading.build_vae(parts.vae_config),
               "EVA": loading.build_eva(parts.eva_cfg)}
    return {name: sum(t.numel() * (size if t.is_floating_point() else t.element_size())
                      for t in (*m.parameters(), *m.buffers())) for name, m in modules.items()}


def check_memory(parts, device, dtype, offload: str = "none", weight_dtype: str = "default") -> dict:
    """Refuse a checkpoint whose weights do not fit this machine's RAM (or the GPU's free memory).

    weight_dtype fp8_*: the LLM, EVA and UNet weights take one byte each on the GPU (wegen.memory);
    offload="sequential" keeps about one block at a time there, so only RAM is checked."""
    need = estimate_bytes(parts, dtype)
    total = sum(need.values())
    detail = ", ".join(f"{k} {_gib(v)}" for k, v in need.items())
    dtype_name = str(dtype).replace("torch.", "")
    ram = machine_memory()
    if ram and total > ram:
        raise CheckpointError(f"{parts.report.root}: the weights need about {_gib(total)} GiB in {dtype_name} "
                              f"({detail}) but this machine has {_gib(ram)} GiB of RAM; use a smaller dtype or a "
                              f"machine with more memory")
    gpu = gpu_memory(device)
    if gpu is not None and offload not in ("spread", "sequential"):
        free, size = gpu
        if weight_dtype != "default":
            itemsize = dtype.itemsize
            need = {k: (v // itemsize if k in ("LLM", "EVA", "UNet") else v) for k, v in need.items()}
            total = sum(need.values())
        on_gpu = total if offload == "none" else max(need["LLM"], need["UNet"] + need["VAE"], need["EVA"])
        if on_gpu > size:
            raise CheckpointError(f"{parts.report.root}: the weights need about {_gib(on_gpu)} GiB on {device} in "
                                  f"{dtype_name} ({detail}, offload={offload}) but it has {_gib(size)} GiB; "
                                  f"use offload 'phase', a smaller dtype, or a larger GPU")
        if on_gpu > free:  # other models (a ComfyUI host's) may be freed for it: a warning, not a refusal
            log.warning("%s: the weights need about %s GiB on %s but %s GiB are free now", parts.report.root,
                        _gib(on_gpu), device, _gib(free))
    return need


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"
