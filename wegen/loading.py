"""Files -> modules: the official release layout, the converted layout, and `convert`.

Official layout (`wegen_mllm_ckpt/`, loaded in the order of the release's `src/eval/inference.py`):
  pretrained/SEED-X/cvlm_llama2_tokenizer_100img_and_224loc_addpatch/  tokenizer.model, added_tokens.json
  pretrained/meta-llama/Llama-2-7b-chat-hf/config.json                  Llama architecture
  pretrained/EVA-CLIP/visual.pt                                         EVA tower state dict
  pretrained/stable-diffusion-xl-base-1.0/{vae,scheduler}/              SDXL VAE + Euler config
  stage1_final/unet/{config.json, diffusion_pytorch_model.bf16.safetensors}
  stage2_final/checkpoint-30000/pytorch_model_merged.bin                stage-2 agent state dict
  pytorch_model.bin                                                     final agent state dict (wins)
Converted layout: `wegen_config.json`, `tokenizer/`, and one safetensors file per module (mmap-loaded).

Modules are built on the meta device and filled with `load_state_dict(assign=True)`, so nothing is
initialised twice; every missing, unexpected or ignored key is reported.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import struct
from dataclasses import asdict, dataclass, field

import torch

from . import checks, rules
from .checks import CheckpointError, need_file
from .decoder import DecoderConfig
from .mllm import MllmConfig, WeGenMLLM
from .vision import EvaConfig, VisionTransformer

log = logging.getLogger(__name__)

OFFICIAL_DIRNAME = "wegen_mllm_ckpt"
TOKENIZER_DIR = "pretrained/SEED-X/cvlm_llama2_tokenizer_100img_and_224loc_addpatch"
LLAMA_DIR = "pretrained/meta-llama/Llama-2-7b-chat-hf"
EVA_FILE = "pretrained/EVA-CLIP/visual.pt"
SDXL_DIR = "pretrained/stable-diffusion-xl-base-1.0"
UNET_DIR = "stage1_final/unet"
UNET_FILE = "diffusion_pytorch_model.bf16.safetensors"  # variant="bf16"
STAGE2_FILE = "stage2_final/checkpoint-30000/pytorch_model_merged.bin"
FINAL_FILE = "pytorch_model.bin"
# Extension: the four YAML-only constants of the release may be overridden here.
SIDECAR_FILE = "wegen_sidecar.json"
SIDECAR_KEYS = {"n_query_tokens": 64, "n_gen_tokens": 64, "eva_head_width": 112, "image_size": 448}
CONVERTED_CONFIG = "wegen_config.json"
# Checkpoints that ship inside the pack (converted layout), found by name from anywhere: `--checkpoint wegen-toy`.
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DIR = os.path.join(PACK_ROOT, "checkpoints")
# The release's inference settings (src/eval/inference.py): what a checkpoint without a `recommended` entry gets.
RELEASE_SETTINGS = {"steps": 50, "cfg": 2.0, "feature_slice": "official"}
RECOMMENDED_KEYS = ("steps", "cfg", "width", "height", "feature_slice")
CONVERTED_FILES = ("eva.safetensors", "mllm.safetensors", "unet.safetensors", "vae.safetensors")

# Agent keys that carry no weights used at inference (reported as ignored, never dropped silently).
IGNORED_AGENT_KEYS = {
    "input_resampler.avgpoolquery.scale": "AvgPoolQuery's unused scalar",
    "adapter.resampler.scale": "AvgPoolQuery's unused scalar",
}


@dataclass
class LoadReport:
    layout: str
    root: str
    missing: dict = field(default_factory=dict)  # module -> [keys]
    unexpected: list = field(default_factory=list)
    ignored: list = field(default_factory=list)  # (key, reason)
    sources: list = field(default_factory=list)
    files: dict = field(default_factory=dict)  # module -> the file its weights came from (named in errors)


@dataclass
class LoadedParts:
    """Everything a WeGenEngine needs, on the CPU, in the dtype the files hold."""

    tokenizer_dir: str
    eva_cfg: EvaConfig
    mllm_cfg: MllmConfig
    decoder_cfg: DecoderConfig
    llama_config: dict
    unet_config: dict
    vae_config: dict
    scheduler_config: dict
    eva_state: dict
    mllm_state: dict
    unet_state: dict
    vae_state: dict
    report: LoadReport
    recommended: dict = field(default_factory=dict)  # extension: the checkpoint's own steps/cfg/size/slice


# Locating files ----------------------------------------------------------------------------------

def bundled_checkpoints() -> dict:
    """{name: folder} of the checkpoints shipped in the pack's checkpoints/ folder."""
    if not os.path.isdir(BUNDLED_DIR):
        return {}
    return {name: os.path.join(BUNDLED_DIR, name) for name in sorted(os.listdir(BUNDLED_DIR))
            if os.path.isfile(os.path.join(BUNDLED_DIR, name, CONVERTED_CONFIG))}


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(layout, root) for a `wegen_mllm_ckpt/` folder, its parent, a converted folder, or a bundled name."""
    name = str(path)
    bundled = bundled_checkpoints()
    if name in bundled and not os.path.isdir(os.path.expanduser(name)):
        path = bundled[name]
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isdir(path):
        names = ", ".join(bundled) or "none"
        raise CheckpointError(f"checkpoint folder not found: {path} (give the wegen_mllm_ckpt/ folder, its parent, "
                              f"a folder written by `python -m wegen convert`, or a bundled name: {names})")
    if os.path.isfile(os.path.join(path, CONVERTED_CONFIG)):
        return "converted", path
    if os.path.isdir(os.path.join(path, "pretrained")) or os.path.isfile(os.path.join(path, FINAL_FILE)):
        return "official", path
    inner = os.path.join(path, OFFICIAL_DIRNAME)
    if os.path.isdir(inner):
        return "official", inner
    raise CheckpointError(f"{path} is not a WeGen checkpoint: expected {CONVERTED_CONFIG} (converted layout), "
                          f"or pretrained/ and {FINAL_FILE} (official {OFFICIAL_DIRNAME}/ layout), "
                          f"or a {OFFICIAL_DIRNAME}/ subfolder")


def _need(root: str, rel: str) -> str:
    return need_file(os.path.join(root, rel), f" (expected at {rel} inside {root})")


def _first_existing(root: str, folder: str, names: tuple[str, ...]) -> str:
    for name in names:
        full = os.path.join(root, folder, name)
        if os.path.exists(full):
            return need_file(full)
    raise CheckpointError(f"checkpoint is incomplete: none of {', '.join(names)} in {os.path.join(root, folder)}")


def required_official_files(root: str) -> list[str]:
    """Every file the official layout must hold (checked before anything is read)."""
    rels = [f"{TOKENIZER_DIR}/tokenizer.model", f"{TOKENIZER_DIR}/added_tokens.json", f"{LLAMA_DIR}/config.json",
            EVA_FILE, f"{SDXL_DIR}/vae/config.json", f"{SDXL_DIR}/scheduler/scheduler_config.json",
            f"{UNET_DIR}/config.json", f"{UNET_DIR}/{UNET_FILE}", FINAL_FILE]
    return [_need(root, rel) for rel in rels]


# Reading files -----------------------------------------------------------------------------------

def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load_pickle(path: str) -> dict:
    """A release `.bin`/`.pt` state dict with weights_only=True (no code runs); refused otherwise."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {path}: it needs more than plain tensors to unpickle "
                              f"(weights_only=True failed: {str(e).splitlines()[0]}). Only plain state dicts are "
                              f"loaded, since a pickle that runs code is unsafe") from e
    except Exception as e:  # truncated zip, bad magic number, ...
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return sd


def load_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {k: v for k, v in load_file(path, device="cpu").items() if not k.startswith(PAD_PREFIX)}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({e})") from e


def read_sidecar(root: str) -> dict:
    values = dict(SIDECAR_KEYS)
    path = os.path.join(root, SIDECAR_FILE)
    if os.path.isfile(path):
        values.update(checks.check_sidecar(read_json(path), path))
    elif os.path.exists(path):
        need_file(path)
    return values


def eva_config_from_state(sd: dict, constants: dict, path: str = "EVA weights") -> EvaConfig:
    """EVA dimensions from tensor shapes; head width and image size from the sidecar constants."""
    checks.check_eva_state(sd, path)
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_pos = sd["pos_embed"].shape[1] - 1
    grid = int(round(n_pos ** 0.5))
    cfg = EvaConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                    head_width=constants["eva_head_width"], mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
                    n_query=constants["n_query_tokens"])
    if cfg.image_size != constants["image_size"]:
        raise CheckpointError(f"EVA pos_embed implies {cfg.image_size}px input but image_size is "
                              f"{constants['image_size']}; fix {SIDECAR_FILE}")
    if width % cfg.head_width:
        raise CheckpointError(f"EVA width {width} is not a multiple of eva_head_width {cfg.head_width}")
    return cfg


def split_agent_state(agent: dict, report: LoadReport) -> tuple[dict, dict]:
    """Release agent keys -> (mllm state, adapter.unet overlay); drops rotary inv_freq, reports the rest."""
    mllm, unet = {}, {}
    for key, value in agent.items():
        if key.endswith("rotary_emb.inv_freq"):
            report.ignored.append((key, "rotary buffer, recomputed by transformers"))
        elif key in IGNORED_AGENT_KEYS:
            report.ignored.append((key, IGNORED_AGENT_KEYS[key]))
        elif key.startswith(("llm.", "input_resampler.proj.", "output_resampler.proj.")):
            mllm[key] = value
        elif key.startswith("adapter.unet."):
            unet[key[len("adapter.unet."):]] = value
        else:
            report.unexpected.append(key)
    return mllm, unet


def check_configs(llama, unet, vae, scheduler, where: tuple):
    """Every size of every config in bounds (checks.py), before any weight is read or module built."""
    checks.check_llama(llama, where[0])
    checks.check_unet(unet, where[1])
    checks.check_vae(vae, where[2])
    checks.check_scheduler(scheduler, where[3])


def load_official(root: str) -> LoadedParts:
    required_official_files(root)
    report = LoadReport("official", root)
    constants = read_sidecar(root)
    tok_dir = os.path.join(root, TOKENIZER_DIR)
    paths = [os.path.join(root, LLAMA_DIR, "config.json"), os.path.join(root, UNET_DIR, "config.json"),
             os.path.join(root, SDXL_DIR, "vae", "config.json"),
             os.path.join(root, SDXL_DIR, "scheduler", "scheduler_config.json")]
    llama_config, unet_config, vae_config, scheduler_config = configs = [read_json(p) for p in paths]
    check_configs(*configs, where=paths)
    eva_state = load_pickle(os.path.join(root, EVA_FILE))
    report.sources.append(EVA_FILE)
    unet_state = load_safetensors(os.path.join(root, UNET_DIR, UNET_FILE))
    vae_file = _first_existing(root, f"{SDXL_DIR}/vae", (
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"))
    vae_state = load_safetensors(vae_file)
    report.files.update(eva=os.path.join(root, EVA_FILE), unet=os.path.join(root, UNET_DIR, UNET_FILE),
                        vae=vae_file, mllm=os.path.join(root, FINAL_FILE))
    # Agent weights: stage 2 first, then the final bin on top (the last one wins).
    agent: dict = {}
    for rel in (STAGE2_FILE, FINAL_FILE):
        path = os.path.join(root, rel)
        if os.path.exists(path) and need_file(path):
            agent.update(load_pickle(path))
            report.sources.append(rel)
        else:
            log.info("%s not present; skipped (the final %s holds the whole agent)", rel, FINAL_FILE)
    mllm_state, unet_overlay = split_agent_state(agent, report)
    unet_state.update(unet_overlay)
    return _assemble(tok_dir, constants, llama_config, unet_config, vae_config, scheduler_config,
                     eva_state, mllm_state, unet_state, vae_state, report)


def _assemble(tok_dir, constants, llama_config, unet_config, vae_config, scheduler_config,
              eva_state, mllm_state, unet_state, vae_state, report) -> LoadedParts:
    if "llm.model.embed_tokens.weight" not in mllm_state or "input_resampler.proj.weight" not in mllm_state:
        raise CheckpointError(f"the agent weights in {report.root} lack the LLM or its projections "
                              f"(no llm.model.embed_tokens.weight / input_resampler.proj.weight)")
    eva_cfg = eva_config_from_state(eva_state, constants, report.files.get("eva", report.root))
    for key in ("input_resampler.proj.weight", "llm.model.embed_tokens.weight"):
        checks.check_matrix(mllm_state, key, report.files.get("mllm", report.root))
    hidden, feature_dim = mllm_state["input_resampler.proj.weight"].shape
    mllm_cfg = MllmConfig(hidden=hidden, feature_dim=feature_dim, n_query=constants["n_query_tokens"],
                          n_gen_tokens=constants["n_gen_tokens"])
    llama_config = dict(llama_config, vocab_size=mllm_state["llm.model.embed_tokens.weight"].shape[0])
    if llama_config.get("hidden_size") != hidden:
        raise CheckpointError(f"Llama config hidden_size {llama_config.get('hidden_size')} != projection width "
                              f"{hidden}")
    if unet_config.get("cross_attention_dim") != feature_dim and unet_config.get("encoder_hid_dim") != feature_dim:
        raise CheckpointError(f"UNet cross_attention_dim {unet_config.get('cross_attention_dim')} does not match "
                              f"the image-feature width {feature_dim}")
    vae_scale = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    decoder_cfg = DecoderConfig(context_dim=feature_dim, latent_channels=vae_config.get("latent_channels", 4),
                                vae_scale_factor=vae_scale,
                                default_size=int(unet_config.get("sample_size", 128)) * vae_scale,
                                scaling_factor=float(vae_config.get("scaling_factor", 0.13025)),
                                force_upcast=bool(vae_config.get("force_upcast", True)))
    return LoadedParts(tok_dir, eva_cfg, mllm_cfg, decoder_cfg, llama_config, unet_config, vae_config,
                       scheduler_config, eva_state, mllm_state, unet_state, vae_state, report)


def load_converted(root: str) -> LoadedParts:
    path = os.path.join(root, CONVERTED_CONFIG)
    config = read_json(path)
    sections = ("constants", "llama", "unet", "vae", "scheduler")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in sections):
        raise CheckpointError(f"{path}: must be an object with the objects {', '.join(sections)}")
    constants = dict(SIDECAR_KEYS, **checks.check_sidecar(config["constants"], f"{path}: constants"))
    check_configs(*(config[k] for k in sections[1:]), where=tuple(f"{path}: {k}" for k in sections[1:]))
    for name in CONVERTED_FILES:
        _need(root, name)
    _need(root, "tokenizer/tokenizer.model")
    report = LoadReport("converted", root, sources=list(CONVERTED_FILES))
    report.files.update({n.split(".")[0]: os.path.join(root, n) for n in CONVERTED_FILES})
    states = [load_safetensors(os.path.join(root, name)) for name in CONVERTED_FILES]
    parts = _assemble(os.path.join(root, "tokenizer"), constants, config["llama"], config["unet"],
                      config["vae"], config["scheduler"], *states, report)
    parts.recommended = check_recommended(config.get("recommended", {}), os.path.join(root, CONVERTED_CONFIG))
    return parts


def check_recommended(values, path: str) -> dict:
    """A checkpoint's `recommended` settings (an extension), checked: unknown keys or bad values name the file."""
    if not isinstance(values, dict) or set(values) - set(RECOMMENDED_KEYS):
        raise CheckpointError(f"{path}: 'recommended' must be an object with keys among {list(RECOMMENDED_KEYS)}, "
                              f"got {values!r}")
    # the ranges every entry point accepts (rules.check_steps / check_size), so a bad entry names this file
    # instead of failing later at decode time; JSON true/false are no numbers here
    try:
        if "steps" in values:
            rules.check_steps(values["steps"])
        rules.check_size(values.get("width", 8), values.get("height", 8))
    except ValueError as e:
        raise CheckpointError(f"{path}: recommended {e}") from None
    cfg = values.get("cfg", 0.0)
    if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not 0 <= cfg < float("inf"):
        raise CheckpointError(f"{path}: recommended cfg must be a finite number >= 0, got {values['cfg']!r}")
    if values.get("feature_slice", "official") not in rules.FEATURE_SLICES:
        raise CheckpointError(f"{path}: recommended feature_slice must be 'official' or 'aligned', "
                              f"got {values['feature_slice']!r}")
    return dict(values)


def recommended_settings(checkpoint: str) -> dict:
    """steps, cfg, feature_slice (+ width/height where the checkpoint names them) without loading weights:
    the checkpoint's `recommended` entry over the release's settings."""
    layout, root = resolve_checkpoint(checkpoint)
    values = dict(RELEASE_SETTINGS)
    if layout == "converted":
        path = os.path.join(root, CONVERTED_CONFIG)
        values.update(check_recommended(read_json(path).get("recommended", {}), path))
    return values


def load_parts(checkpoint: str) -> LoadedParts:
    layout, root = resolve_checkpoint(checkpoint)
    return load_official(root) if layout == "official" else load_converted(root)


# Building modules --------------------------------------------------------------------------------

def materialize(module: torch.nn.Module, state: dict, name: str, report: LoadReport, strict: bool = True):
    """Fill a meta-device module from `state` (assign=True); missing weights are an error naming them."""
    checks.check_shapes(module, state, name, report.files.get(name, report.root))
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        report.unexpected += [f"{name}:{k}" for k in result.unexpected_keys]
    still_meta = [k for k, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if result.missing_keys:
        report.missing[name] = list(result.missing_keys)
    if still_meta and strict:
        raise CheckpointError(f"{report.root}: {name} weights missing from the checkpoint: "
                              f"{', '.join(still_meta[:8])}{' ...' if len(still_meta) > 8 else ''} "
                              f"({len(still_meta)} tensors)")
    return module


def build_eva(cfg: EvaConfig, state: dict | None = None, report: LoadReport | None = None):
    with torch.device("meta"):
        eva = VisionTransformer(cfg)
    if state is None:
        return eva
    return materialize(eva, state, "eva", report)


def build_mllm(cfg: MllmConfig, llama_config: dict, state: dict | None = None, report: LoadReport | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in llama_config.items() if not k.startswith("_")})
    config.tie_word_embeddings = False  # Llama-2 keeps an untied lm_head
    with torch.device("meta"):
        model = WeGenMLLM(cfg, LlamaForCausalLM(config))
    if state is None:
        return model
    materialize(model, state, "mllm", report, strict=False)
    rotary = model.llm.model.rotary_emb  # non-persistent buffers: rebuild on the CPU
    model.llm.model.rotary_emb = type(rotary)(config=model.llm.config)
    still_meta = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{report.root}: LLM weights missing from the agent checkpoint: "
                              f"{', '.join(still_meta[:8])} ({len(still_meta)} tensors)")
    return model


def build_unet(unet_config: dict, state: dict | None = None, report: LoadReport | None = None):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    return unet if state is None else materialize(unet, state, "unet", report)


def build_vae(vae_config: dict, state: dict | None = None, report: LoadReport | None = None):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    return vae if state is None else materialize(vae, state, "vae", report)


def build_scheduler(scheduler_config: dict):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(scheduler_config)


# Converting --------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
PAD_PREFIX = "__pad"


def save_aligned_safetensors(tensors: dict, path: str, align: int = 64):
    """A safetensors file whose tensors start on `align`-byte boundaries of the mmap.

    CPU kernels may round differently for unaligned weights, so the converted layout pads
    (with `__pad*` uint8 tensors) to load bit-identical to the official pickles.
    """
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for i, name in enumerate(sorted(tensors)):
        t = tensors[name].detach().contiguous().cpu()
        pad = (-offset) % align
        if pad:
            header[f"{PAD_PREFIX}{i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            chunks.append(bytes(pad))
            offset += pad
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-(8 + len(blob))) % align)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for chunk in chunks:
            f.write(chunk)

def convert(src: str, dst: str, weight_dtype: str = "default") -> str:
    """Official layout -> converted layout (wegen_config.json + safetensors). Returns dst.

    weight_dtype fp8_e4m3fn / fp8_e5m2 (an extension; either layout as src) stores the Linear and Conv2d weights
    of the LLM, EVA and UNet in fp8 (wegen.memory); loading upcasts them unless the engine keeps fp8.
    """
    from . import memory

    storage = memory.check_weight_dtype(weight_dtype)
    parts = load_parts(src)
    if parts.report.layout != "official" and storage is None:
        raise CheckpointError(f"{src} is already in the converted layout")
    dst = os.path.abspath(dst)
    try:
        os.makedirs(os.path.join(dst, "tokenizer"), exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot write the converted checkpoint to {dst}: {e}") from e
    for name in os.listdir(parts.tokenizer_dir):
        shutil.copy2(os.path.join(parts.tokenizer_dir, name), os.path.join(dst, "tokenizer", name))
    states = (parts.eva_state, parts.mllm_state, parts.unet_state, parts.vae_state)
    if storage is not None:
        metas = (build_eva(parts.eva_cfg), build_mllm(parts.mllm_cfg, parts.llama_config),
                 build_unet(parts.unet_config))
        states = tuple(memory.fp8_state(m, st, storage) for m, st in zip(metas, states[:3])) + states[3:]
    for name, state in zip(CONVERTED_FILES, states):
        save_aligned_safetensors(state, os.path.join(dst, name))
    config = {"format": "wegen-converted", "version": 1,
              "constants": {"n_query_tokens": parts.mllm_cfg.n_query, "n_gen_tokens": parts.mllm_cfg.n_gen_tokens,
                            "eva_head_width": parts.eva_cfg.head_width, "image_size": parts.eva_cfg.image_size},
              "eva": asdict(parts.eva_cfg), "llama": parts.llama_config, "unet": parts.unet_config,
              "vae": parts.vae_config, "scheduler": parts.scheduler_config,
              "source": {"layout": parts.report.layout, "files": parts.report.sources}, "weight_dtype": weight_dtype}
    if parts.recommended:
        config["recommended"] = parts.recommended
    with open(os.path.join(dst, CONVERTED_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1, default=str)
    return dst
