"""Diversity sweeps: prompts (e.g. Prompt Self-Rewrites) x seeds -> images + contact sheet. EXTENSION.

Not in the official release (it decodes one greedy prompt at a time). A sweep of K prompts and S seeds
makes K * S images, item order prompt-major (item = k * S + s). It runs in two batched stages:
  1. encode: the K prompts through the MLLM (text + forced 64 image tokens) in batches of up to
     `encode_batch` prompts; prompt k decodes with seed `encode_seed + k`, so at the release's greedy
     temperature 0 the features do not depend on the batch;
  2. decode: the K * S (features, seed) items through the UNet + VAE in batches of up to `decode_batch`,
     one seeded CPU generator per image (decoder.initial_noise), so every image is the image that a
     single run with its prompt and seed gives (up to float rounding of batched kernels).
Batch sizes come from a memory budget: `item_bytes` estimates one image's peak activations (UNet step
with CFG, or VAE decode, whichever is larger, from the UNet/VAE configs) and one prompt's KV cache.

Exact reproduction: floating-point results depend on the batch a row was in, the device, the dtype and
(on the CPU) the number of threads. `sweep.json` therefore records the batches, the engine and every
setting, and `reproduce` re-runs the batches that made one image, giving it again bit for bit on the
same kind of machine. `python -m wegen sweep --replay DIR/sweep.json --index I --out FILE.png` does that.

With an output folder, each decode batch writes its PNGs and updates `sweep.json` (atomic writes), and
the features go to `features.safetensors`: a rerun with `resume=True` skips finished batches and redoes
unfinished ones whole, so resumed images equal uninterrupted ones bit for bit (the folder's format and
resume checks: wegen/sweep_files.py). The same planner and writer serve the Ray executor
(wegen/ray_sweep.py), which only changes where batches run.

Diversity (reported per sweep): `features_cosine` = mean pairwise cosine distance (1 - cos) of the K
flattened 64-token feature sets; `features_rms` = their mean pairwise RMS difference; `pixels_rms` =
mean pairwise RMS difference of all K * S images (8-bit quantized as saved, area-scaled to at most
256 px, values 0..1). 0 means identical; larger is more diverse.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch

from . import sweep_files
from .rules import MAX_SEED, check_seed
from .sweep_files import MANIFEST, SHEET, load_manifest  # noqa: F401 (callers import them from here)

log = logging.getLogger(__name__)

MAX_ITEMS = 4096
DIVERSITY_SIDE = 256  # pixels_rms compares images area-scaled to at most this side
_DTYPE_BYTES = {"fp32": 4, "fp64": 8, "bf16": 2, "fp16": 2}
ALLOC_SLACK = 1.5  # allocator fragmentation + temporaries on top of the activation estimate


@dataclass(frozen=True)
class SweepSettings:
    """Everything besides prompts and seeds that decides a sweep's images (recorded in sweep.json)."""

    steps: int = 50  # release: 50
    cfg: float = 2.0  # release: 2 (FID) or 7 (CLIP-T)
    width: int | None = None  # None: the UNet's default size
    height: int | None = None
    encode_seed: int = 0  # prompt k samples its text with encode_seed + k (ignored at temperature 0)
    temperature: float = 0.0  # MLLM text sampling before the image (release: greedy)
    top_p: float = 1.0
    max_new_tokens: int = 512  # release: 512
    var_cfg_scale: float = 1.0  # release: 1 (off)
    feature_slice: str = "official"
    force_image: bool = True
    memory_budget_mb: int = 4096  # bounds the batch sizes (see item_bytes)
    max_batch: int = 16  # upper bound of a batch whatever the budget

    def encode_kwargs(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                    var_cfg_scale=self.var_cfg_scale, feature_slice=self.feature_slice, force_image=self.force_image)

    def decode_kwargs(self) -> dict:
        return dict(steps=self.steps, cfg=self.cfg, width=self.width, height=self.height)


@dataclass
class SweepPlan:
    prompts: list[str]  # K
    seeds: list[int]  # S
    encode_batches: list[list[int]]  # prompt indices
    decode_batches: list[list[int]]  # item indices (item = k * S + s)

    def item(self, index: int) -> tuple[int, int]:
        """item index -> (prompt index, seed index)."""
        return divmod(index, len(self.seeds))

    def encode_seed(self, settings: SweepSettings, k: int) -> int:
        return (settings.encode_seed + k) % (MAX_SEED + 1)


@dataclass
class SweepResult:
    images: torch.Tensor  # (K * S, H, W, 3) float32 0..1, prompt-major
    prompts: list[str]  # per image
    seeds: list[int]  # per image
    captions: list[str]  # per image: "#k seed s: prompt"
    contact_sheet: torch.Tensor  # (1, H', W', 3)
    features: torch.Tensor  # (K, 64, C): one feature set per prompt
    diversity: dict
    manifest: dict = field(default_factory=dict)


# Inputs ------------------------------------------------------------------------------------------

def parse_seeds(text, base: int = 0) -> list[int]:
    """--seeds: a count N (seeds base .. base + N - 1) or a comma list of seeds ("7,42,1000"; "42," = one seed)."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            count = int(text)
            if not 1 <= count <= MAX_ITEMS:
                raise ValueError(f"seeds count must be in 1..{MAX_ITEMS}, got {count}")
            seeds = [(base + i) % (MAX_SEED + 1) for i in range(count)]
    except ValueError as e:
        if "count" in str(e):
            raise
        raise ValueError(f"seeds must be a count (e.g. 4) or a comma list of integers (e.g. 7,42 or 42,), "
                         f"got {text!r}") from None
    return check_seeds(seeds)


def check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    for s in seeds:
        check_seed(s, "each seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (a repeated seed repeats its images), got {seeds}")
    return seeds


def check_sweep_inputs(prompts, seeds, settings: SweepSettings):
    from .rules import check_decode_args, check_size

    if not isinstance(prompts, (list, tuple)) or not prompts or \
            not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    check_seeds(seeds)
    if len(prompts) * len(seeds) > MAX_ITEMS:
        raise ValueError(f"a sweep makes at most {MAX_ITEMS} images; {len(prompts)} prompts x {len(seeds)} seeds "
                         f"= {len(prompts) * len(seeds)}")
    check_decode_args(settings.steps, settings.cfg, 1.0)
    if settings.width is not None or settings.height is not None:
        check_size(settings.width, settings.height)
    if not isinstance(settings.memory_budget_mb, int) or settings.memory_budget_mb < 1:
        raise ValueError(f"memory_budget_mb must be a positive integer (MiB), got {settings.memory_budget_mb!r}")
    if not isinstance(settings.max_batch, int) or settings.max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {settings.max_batch!r}")


# Engine description and memory estimates ----------------------------------------------------------

def engine_info(engine) -> dict:
    """What planning and sweep.json need to know about an engine (JSON-ready; travels from Ray actors)."""
    from .engine import DTYPES

    dtype = next(k for k, v in DTYPES.items() if v == engine.dtype)
    unet, vae, llm = engine.unet.config, engine.vae.config, engine.mllm.llm.config
    return {
        "checkpoint": os.path.realpath(engine.report.root),
        "dtype": dtype,
        "vae_dtype": next(k for k, v in DTYPES.items() if v == engine.vae.dtype),
        "device": str(engine.device),
        "offload": engine.offload,
        "preset": getattr(engine, "preset", "comfyui"),
        "weight_dtype": getattr(engine, "weight_dtype", "default"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "default_size": engine.decoder_cfg.default_size,
        "vae_scale_factor": engine.decoder_cfg.vae_scale_factor,
        "unet_channels": list(unet.block_out_channels),
        "unet_heads": _unet_heads(unet),
        "unet_attention": [t.startswith("CrossAttn") for t in unet.down_block_types],
        "vae_channels": list(vae.block_out_channels),
        "llm_layers": llm.num_hidden_layers,
        "llm_kv_width": getattr(llm, "num_key_value_heads", llm.num_attention_heads) *
        (getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads),
        "llm_vocab": llm.vocab_size,
        "n_gen_tokens": engine.mllm_cfg.n_gen_tokens,
    }


def _unet_heads(unet) -> list[int]:
    """Heads per UNet level (SDXL configs store head counts in attention_head_dim)."""
    n = len(unet.block_out_channels)
    heads = unet.num_attention_heads or unet.attention_head_dim
    return list(heads) if isinstance(heads, (list, tuple)) else [int(heads)] * n


def item_bytes(info: dict, width: int, height: int, cfg: float) -> int:
    """Estimated peak bytes of one image: max(UNet step with CFG, VAE decode) x ALLOC_SLACK.

    UNet: ~24 live activations per level (resnets, attention, skips) of channels x latent area / 4^level,
    plus one attention score matrix heads x tokens^2 at attention levels; CFG doubles the batch.
    VAE decode: ~6 activations per level at full resolution / 4^level, plus the mid-block attention
    matrix (tokens^2 at the lowest resolution), in the VAE's dtype.
    """
    el, vae_el = _DTYPE_BYTES[info["dtype"]], _DTYPE_BYTES[info["vae_dtype"]]
    area = (width // info["vae_scale_factor"]) * (height // info["vae_scale_factor"])
    unet = 0
    for level, ch in enumerate(info["unet_channels"]):
        tokens = area / 4 ** level
        unet += 24 * ch * tokens * el
        if info["unet_attention"][level]:
            unet += info["unet_heads"][level] * tokens * tokens * el
    unet *= 2 if cfg > 1.0 else 1
    vae = sum(6 * ch * width * height / 4 ** level * vae_el for level, ch in enumerate(info["vae_channels"]))
    low = width * height / 4 ** (len(info["vae_channels"]) - 1)  # mid-block attention tokens
    vae += low * low * vae_el
    return int(ALLOC_SLACK * max(unet, vae))


def prompt_bytes(info: dict, n_tokens: int) -> int:
    """Estimated bytes of one prompt row in the MLLM decode: its KV cache (+ a float32 logits row)."""
    kv = 2 * info["llm_layers"] * info["llm_kv_width"] * n_tokens * _DTYPE_BYTES[info["dtype"]]
    return int(ALLOC_SLACK * (kv + 4 * info["llm_vocab"]))


def batch_size(per_item: int, settings: SweepSettings, n: int) -> int:
    """Largest batch within memory_budget_mb and max_batch (at least 1, at most n)."""
    fits = settings.memory_budget_mb * 2 ** 20 // max(per_item, 1)
    if fits < 1:
        log.warning("one item needs ~%d MiB, over memory_budget_mb=%d; running one at a time",
                    per_item // 2 ** 20, settings.memory_budget_mb)
    return max(1, min(settings.max_batch, fits, n))


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def make_plan(info: dict, prompts: list[str], seeds: list[int], settings: SweepSettings,
              prompt_tokens: int = 256) -> SweepPlan:
    """Fixed batches for both stages (recorded, so a resumed or replayed run makes the same batches)."""
    enc = batch_size(prompt_bytes(info, prompt_tokens + settings.max_new_tokens + info["n_gen_tokens"] + 2),
                     settings, len(prompts))
    n_items = len(prompts) * len(seeds)
    dec = batch_size(item_bytes(info, settings.width, settings.height, settings.cfg), settings, n_items)
    return SweepPlan(list(prompts), list(seeds), chunks(list(range(len(prompts))), enc),
                     chunks(list(range(n_items)), dec))


def resolve_settings(settings: SweepSettings, info: dict) -> SweepSettings:
    """width/height None -> the UNet's default size."""
    size = info["default_size"]
    return SweepSettings(**{**asdict(settings), "width": settings.width or size, "height": settings.height or size})


# Batches: the one place that calls the engine (local executor and Ray actors alike) ----------------

def encode_batch(engine, prompts: list[str], seeds: list[int], settings: SweepSettings, callback=None):
    """A batch of prompts -> (b, 64, C) float32 features (one seed per prompt)."""
    return engine.encode(list(prompts), seed=list(seeds), callback=callback, **settings.encode_kwargs()).features


def decode_batch(engine, features: torch.Tensor, seeds: list[int], settings: SweepSettings, callback=None):
    """(b, 64, C) features + one seed per image -> (b, H, W, 3) images."""
    return engine.decode_pixels(features, seed=list(seeds), callback=callback, **settings.decode_kwargs())


class LocalExecutor:
    """Runs the batches in this process on one engine, in order."""

    def __init__(self, engine, callback=None):
        self.engine = engine
        self.callback = callback
        self.info = engine_info(engine)

    def rewrite(self, prompt: str, n: int, **kwargs):
        from .rewrite import rewrite_prompt

        return rewrite_prompt(self.engine, prompt, n, callback=self.callback, **kwargs)

    def encode(self, jobs, settings: SweepSettings):
        for prompts, seeds in jobs:
            yield encode_batch(self.engine, prompts, seeds, settings, self.callback)

    def decode(self, jobs, settings: SweepSettings):
        for features, seeds in jobs:
            yield decode_batch(self.engine, features, seeds, settings, self.callback)


# The sweep ---------------------------------------------------------------------------------------

def sweep(engine, prompts: list[str], seeds: list[int], settings: SweepSettings = SweepSettings(), *,
          out_dir: str | None = None, resume: bool = False, rewrite: dict | None = None, callback=None,
          progress=None) -> SweepResult:
    """K prompts x S seeds on one engine, batched (see the module docstring). Extension.

    Args:
        engine: a WeGenEngine.
        prompts: K prompts (for instance RewriteResult.prompts).
        seeds: S distinct image seeds; every prompt is drawn with every seed.
        settings: SweepSettings (steps, cfg, size, MLLM settings, memory budget).
        out_dir: write PNGs, contact_sheet.png, features.safetensors and sweep.json there.
        resume: with out_dir, continue a sweep.json left there (finished batches are skipped).
        rewrite: how the prompts were made (RewriteResult.settings + source), recorded in sweep.json.
        callback: engine-style per-step callback (progress, interrupts).
        progress: called as progress(images_done, images_total) after each decode batch.
    """
    return run_sweep(LocalExecutor(engine, callback), prompts, seeds, settings, out_dir=out_dir, resume=resume,
                     rewrite=rewrite, progress=progress)


def run_sweep(executor, prompts, seeds, settings: SweepSettings = SweepSettings(), *, out_dir=None,
              resume=False, rewrite=None, progress=None) -> SweepResult:
    """The sweep on any executor (LocalExecutor, ray_sweep.RayExecutor): plan, encode, decode, write, report."""
    # 1) check inputs and plan
    check_sweep_inputs(prompts, seeds, settings)
    info = executor.info
    settings = resolve_settings(settings, info)
    plan = make_plan(info, prompts, seeds, settings)
    manifest = sweep_files.build_manifest(info, settings, plan, rewrite)
    done = set()
    if out_dir is not None:
        done = sweep_files.open_out_dir(out_dir, manifest, resume)

    # 2) encode every prompt (or read the features a resumed sweep saved)
    features = sweep_files.load_features(out_dir, plan) if done else None
    if features is None:
        jobs = [([plan.prompts[k] for k in b], [plan.encode_seed(settings, k) for k in b])
                for b in plan.encode_batches]
        features = torch.cat(list(executor.encode(jobs, settings)))  # (K, 64, C)
        if out_dir is not None:
            sweep_files.save_features(out_dir, features)

    # 3) decode the items batch by batch, writing each finished batch
    images: list = [None] * (len(plan.prompts) * len(plan.seeds))
    pending = [b for b in plan.decode_batches if not set(b) <= done]
    for b in plan.decode_batches:
        if set(b) <= done:
            for i in b:
                images[i] = sweep_files.read_png(out_dir, manifest["items"][i]["file"])
    jobs = ((features[[plan.item(i)[0] for i in b]], [plan.seeds[plan.item(i)[1]] for i in b]) for b in pending)
    for b, batch_images in zip(pending, executor.decode(jobs, settings)):
        for i, image in zip(b, batch_images):
            images[i] = image
        if out_dir is not None:
            sweep_files.write_batch(out_dir, manifest, b, batch_images)
        if progress is not None:
            progress(sum(im is not None for im in images), len(images))

    # 4) report: diversity, contact sheet, final manifest
    return _finish(out_dir, manifest, plan, features, torch.stack(images))


def _finish(out_dir, manifest, plan: SweepPlan, features, images) -> SweepResult:
    from .images import contact_sheet

    item_prompts = [plan.prompts[plan.item(i)[0]] for i in range(len(images))]
    item_seeds = [plan.seeds[plan.item(i)[1]] for i in range(len(images))]
    captions = [f"#{plan.item(i)[0]} seed {s}: {p}" for i, (p, s) in enumerate(zip(item_prompts, item_seeds))]
    sheet = contact_sheet(images, captions, columns=len(plan.seeds))
    manifest["diversity"] = diversity(features, images)
    if out_dir is not None:
        sweep_files.finish_out_dir(out_dir, manifest, sheet)
    log.info("sweep of %d images: diversity %s", len(images), manifest["diversity"])
    return SweepResult(images, item_prompts, item_seeds, captions, sheet, features, manifest["diversity"], manifest)


# Diversity ---------------------------------------------------------------------------------------

def diversity(features: torch.Tensor, images: torch.Tensor) -> dict:
    """Mean pairwise distances: features (K, 64, C) cosine and RMS; images (N, H, W, 3) RMS (see module doc)."""
    f = features.reshape(features.shape[0], -1).double()
    cos = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(f, dim=1).T
    return {
        "features_cosine": _mean_offdiag(1.0 - cos),
        "features_rms": _mean_offdiag(torch.cdist(f, f) / math.sqrt(f.shape[1])),
        "pixels_rms": _mean_offdiag(_pairwise_rms(_diversity_pixels(images))),
        "n_prompts": int(features.shape[0]),
        "n_images": int(images.shape[0]),
    }


def _diversity_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) -> (N, D) float64: 8-bit quantized (as saved), area-scaled to <= DIVERSITY_SIDE px."""
    q = torch.clamp(255.0 * images.float() + 0.5, 0, 255).floor() / 255.0
    n, h, w = q.shape[:3]
    scale = DIVERSITY_SIDE / max(h, w)
    x = q.permute(0, 3, 1, 2)
    if scale < 1:
        x = torch.nn.functional.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                            mode="area")
    return x.reshape(n, -1).double()


def _pairwise_rms(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, x) / math.sqrt(x.shape[1])


def _mean_offdiag(d: torch.Tensor) -> float:
    n = d.shape[0]
    if n < 2:
        return 0.0
    return float((d.sum() - d.diagonal().sum()) / (n * (n - 1)))


# Replay --------------------------------------------------------------------------------------------

def settings_from_manifest(manifest: dict) -> SweepSettings:
    names = {f.name for f in fields(SweepSettings)}
    return SweepSettings(**{k: v for k, v in manifest["settings"].items() if k in names})


def reproduce(engine, manifest: dict, index: int, callback=None) -> torch.Tensor:
    """Image `index` of a sweep again: re-runs the batches that made it -> (1, H, W, 3).

    Bit for bit when the engine matches manifest["engine"] (device type, dtype, CPU threads); elsewhere
    the same picture up to float rounding (a warning says which setting differs).
    """
    items = manifest["items"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(items):
        raise ValueError(f"index must be an item of the sweep, 0..{len(items) - 1}, got {index!r}")
    settings = settings_from_manifest(manifest)
    info = engine_info(engine)
    for key in sweep_files.ENGINE_MUST_MATCH[1:]:
        if info[key] != manifest["engine"].get(key):
            log.warning("reproducing with %s=%r but the sweep used %r: expect float-rounding differences",
                        key, info[key], manifest["engine"].get(key))
    batch = manifest["decode_batches"][items[index]["decode_batch"]]
    needed = sorted({items[i]["prompt_index"] for i in batch})
    feats = {}
    for b in manifest["encode_batches"]:
        if set(b) & set(needed):
            out = encode_batch(engine, [manifest["prompts"][k] for k in b],
                               [(settings.encode_seed + k) % (MAX_SEED + 1) for k in b], settings, callback)
            feats.update({k: out[j] for j, k in enumerate(b)})
    features = torch.stack([feats[items[i]["prompt_index"]] for i in batch])
    images = decode_batch(engine, features, [items[i]["seed"] for i in batch], settings, callback)
    return images[batch.index(index)][None]
