"""WeGenEngine: the one facade the nodes, the CLI, chat, rewrite, sweep and the bench call.

prompt + images -> tokens (prompting) -> EVA features (vision) -> token generation (mllm) -> 64 features
-> UNet + VAE (decoder) -> pixels. Images in and out are float32 tensors (B, H, W, 3) in 0..1 on
the CPU (ComfyUI's IMAGE layout). Engines are cached per (checkpoint, dtype, device, offload, preset,
weight_dtype). preset="release" takes the release's numerics (see PRESETS); wegen.memory has the memory modes.

Public API (README "Engine API"): load, encode (prompt -> WeGenCondition), decode_pixels (features ->
images), generate (both), understand, reconstruct, encode_images (EVA), generate_tokens + reply_text (the
LLM's token generation for callers that build their own prompts: chat, rewrite, bench), prefix_cache (the
engine's prompt-prefix KV cache), release (frees the device state besides the weights), set_offload.
Input rules (seeds, sizes, sampling) are wegen/rules.py's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from . import checks, decoder, fastpath, loading, memory, mllm, prompting, rules, vision
from .prefix_cache import PrefixCache

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# none: everything on the device. idle: each stage's modules go back to the CPU after it runs.
# phase: only the running stage's modules stay on the device (the others move to the CPU when it
# starts), so a turn needs max(LLM, UNet + VAE) of GPU memory. sequential: the LLM's layers, EVA's and the UNet's
# blocks stream from CPU memory one at a time (wegen.memory). spread: the LLM is spread over every visible GPU
# with accelerate's device_map, the rest on `device`. phase, sequential and spread are extensions.
OFFLOAD_POLICIES = ("none", "idle", "phase", "sequential", "spread")
RESIDENT_POLICIES = ("none", "sequential", "spread")  # modules are placed once, at load
MODULES = ("mllm", "unet", "vae", "eva")  # the engine's torch modules, by attribute name
# comfyui (default): CPU fp32 noise (a seed gives the same picture on every GPU), bf16 where supported, text-only
# token budget, bicubic input resize. release: the release's choices (README "Official behaviour and extensions").
PRESETS = rules.PRESETS
_ENGINES: dict = {}
_ENGINES_LOCK = threading.Lock()


@dataclass
class WeGenCondition:
    """What the MLLM produced for a batch: 64 features per row + reply text (+ what made them)."""

    features: torch.Tensor  # (B, 64, C) float32, CPU
    texts: list[str]
    prompts: list[str]
    settings: dict = field(default_factory=dict)

    def __len__(self):
        return self.features.shape[0]


def resolve_dtype(dtype: str, device: torch.device, preset: str = "comfyui") -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and preset == "release":
            return torch.float16  # the release runs fp16 (its CPU path does not exist: fp32 there)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _seeds(seed, n: int) -> list[int]:
    """One seed (row b uses seed + b, wrapping past 2**64 - 1) or one per row -> n checked seeds."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"got {len(seed)} seeds for {n} items; give one seed or one per item")
        return [rules.check_seed(int(s)) for s in seed]
    return rules.seed_rows(int(seed), n)


def check_images(images, name: str = "images") -> torch.Tensor:
    """`images` must be a (B, H, W, 3) tensor (ComfyUI's IMAGE layout), else ValueError naming it."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a float tensor (B, H, W, 3) in 0..1, got {shape}")
    return rules.check_finite(images, name)


class WeGenEngine:
    """One loaded checkpoint: its modules, tokenizer, scheduler, placement and prompt-prefix cache.

    Every public method checks its inputs first (ValueError naming the input), runs under `self.lock` (one
    stage at a time per engine) and takes an optional per-step `callback(info)`: info["stage"] is "tokens"
    (token generation) or "denoise" (UNet steps), with "i" and "total"; raising in it stops the run.
    """

    def __init__(self, parts: loading.LoadedParts, device="cpu", dtype="auto", offload="none", preset="comfyui",
                 weight_dtype="default"):
        self.weight_storage = memory.check_weight_dtype(weight_dtype)  # None: the compute dtype
        self.weight_dtype = weight_dtype
        if offload not in OFFLOAD_POLICIES:
            raise ValueError(f"offload must be one of {OFFLOAD_POLICIES}, got {offload!r}")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}") from e
        if offload == "spread" and self.device.type != "cuda":
            raise ValueError(f"offload='spread' spreads the LLM over CUDA GPUs; device is {device!r}")
        self.preset = preset
        self.dtype = resolve_dtype(dtype, self.device, preset)
        self.offload = offload
        self.parts = parts
        self.report = parts.report
        # steps / cfg / size / feature_slice this checkpoint is meant to run with (release settings by default)
        self.recommended = {**loading.RELEASE_SETTINGS, "width": parts.decoder_cfg.default_size,
                            "height": parts.decoder_cfg.default_size, **parts.recommended}
        self.tokenizer = prompting.WeGenTokenizer(parts.tokenizer_dir)
        self.mllm_cfg, self.eva_cfg, self.decoder_cfg = parts.mllm_cfg, parts.eva_cfg, parts.decoder_cfg
        self.image_ids = self.tokenizer.image_token_ids(self.mllm_cfg.n_gen_tokens)
        if self.tokenizer.vocab_size != parts.llama_config["vocab_size"]:
            raise loading.CheckpointError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the LLM embeds "
                f"{parts.llama_config['vocab_size']}")
        rep = parts.report
        checks.check_memory(parts, self.device, self.dtype, offload, weight_dtype)  # before anything is allocated
        self.mllm = _cast(loading.build_mllm(self.mllm_cfg, parts.llama_config, parts.mllm_state, rep), self.dtype)
        self.unet = _cast(loading.build_unet(parts.unet_config, parts.unet_state, rep), self.dtype)
        memory.store_fp8(self.mllm, self.weight_storage)
        memory.store_fp8(self.unet, self.weight_storage)
        upcast = self.decoder_cfg.force_upcast and (self.dtype == torch.float16 or preset == "release")
        vae_dtype = torch.float32 if upcast else self.dtype  # release: the VAE decodes in fp32
        self.vae = _cast(loading.build_vae(parts.vae_config, parts.vae_state, rep), vae_dtype)
        self.scheduler = loading.build_scheduler(parts.scheduler_config)
        self._eva = None  # built on first use: only image inputs need it
        self.lock = threading.RLock()
        self.prefix_cache = PrefixCache()  # prompt KV caches for chat turns (extension); cleared by release()
        fastpath.prepare_decoder_modules(self.unet, self.vae, self.device)
        for name, m in (("mllm", self.mllm), ("unet", self.unet), ("vae", self.vae)):
            m.eval().requires_grad_(False)
            if offload == "spread" and m is self.mllm:
                self.mllm = fastpath.spread_module(m)
            elif offload == "sequential":
                memory.stream(m, memory.stream_units(name, m), self.device)
            elif offload in RESIDENT_POLICIES and not _all_on(m, self.device):
                m.to(self.device)
        parts.mllm_state = parts.unet_state = parts.vae_state = None
        log.info("WeGen loaded %s (%s layout): %s on %s, offload=%s, weights %s, preset %s, attention=sdpa; "
                 "ignored %d keys, unexpected %d", rep.root, rep.layout, str(self.dtype).replace("torch.", ""),
                 self.device, offload, weight_dtype, preset, len(rep.ignored), len(rep.unexpected))
        if rep.unexpected:
            log.warning("unexpected checkpoint keys (not loaded): %s", ", ".join(rep.unexpected[:20]))

    # Loading -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, checkpoint: str, dtype: str = "auto", device: str = "cpu", offload: str = "none",
             preset: str = "comfyui", weight_dtype: str = "default") -> "WeGenEngine":
        """Cached per (checkpoint path, dtype, device, offload, preset, weight_dtype): loading twice returns the
        same object."""
        layout, root = loading.resolve_checkpoint(checkpoint)
        key = (os.path.realpath(root), dtype, str(device), offload, preset, weight_dtype)
        with _ENGINES_LOCK:
            if key not in _ENGINES:
                _ENGINES[key] = cls(loading.load_parts(root), device=device, dtype=dtype, offload=offload,
                                    preset=preset, weight_dtype=weight_dtype)
            return _ENGINES[key]

    @property
    def eva(self) -> vision.VisionTransformer:
        """The EVA-CLIP tower, built on first use (only image inputs need it); see eva_built."""
        if self._eva is None:
            eva = loading.build_eva(self.eva_cfg, self.parts.eva_state, self.report).to(self.dtype)
            memory.store_fp8(eva, self.weight_storage)
            self._eva = eva.eval().requires_grad_(False)
            if self.offload == "sequential":
                memory.stream(self._eva, memory.stream_units("eva", self._eva), self.device)
            elif self.offload in RESIDENT_POLICIES:
                self._eva.to(self.device)
            self.parts.eva_state = None
        return self._eva

    @property
    def eva_built(self) -> bool:
        """Whether the EVA tower is built yet (reading `eva` builds it)."""
        return self._eva is not None

    def release(self, *modules: str) -> None:
        """Free the device state the engine keeps besides the weights: the fast path's CUDA graphs and static
        caches made for the named modules ("mllm", "unet", "vae", "eva"; default: all) and, with the LLM, the
        prompt-prefix KV caches (engine.prefix_cache). Weights stay where they are: ComfyUI's ModelPatcher (the
        host calls this when "Unload models" or eviction moves a module off the GPU) or set_offload move them.
        Anything freed is rebuilt on the next use; results do not change."""
        unknown = [m for m in modules if m not in MODULES]
        if unknown:
            raise ValueError(f"release takes module names among {MODULES}, got {unknown}")
        names = modules or MODULES
        with self.lock:
            built = [getattr(self, n) for n in names if n != "eva"] + ([self._eva] if "eva" in names else [])
            fastpath.release(*(m for m in built if m is not None))
            if "mllm" in names:
                self.prefix_cache.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _using(self, *modules):
        """Modules on the compute device for one stage: offload='idle' moves them back to the CPU afterwards,
        offload='phase' first moves every other stage's modules to the CPU and leaves these in place."""
        if self.offload == "phase":
            self._evict(keep=modules)
        if self.offload in ("idle", "phase"):
            for m in modules:
                m.to(self.device)
        try:
            yield
        finally:
            if self.offload == "idle":
                self._evict(keep=())

    def _evict(self, keep):
        """Move every built module except `keep` off the compute device (dropping fast-path graphs of them)."""
        moved = False
        for m in (self.mllm, self.unet, self.vae, self._eva):
            if m is None or any(m is k for k in keep) or _device_of(m).type == "cpu":
                continue
            fastpath.release(m)
            m.to("cpu")
            moved = True
        if moved and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def set_offload(self, offload: str):
        """Switch a loaded engine between 'none', 'idle' and 'phase' (modules move now; the bench uses it)."""
        allowed = ("none", "idle", "phase")
        if offload not in allowed or self.offload in ("spread", "sequential"):
            raise ValueError(f"set_offload switches between {allowed} (a spread or sequential engine stays as it "
                             f"was loaded), got {offload!r} "
                             f"on an engine loaded with offload={self.offload!r}")
        with self.lock:
            self.offload = offload
            if offload == "none":
                for m in (self.mllm, self.unet, self.vae, self._eva):
                    if m is not None:
                        m.to(self.device)
            else:
                self._evict(keep=())

    # Stages --------------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) 0..1 -> pooled EVA features (N, 64, C) float32 on the CPU."""
        check_images(images)
        with self.lock, torch.inference_mode(), self._using(self.eva):
            resize = "bilinear" if self.preset == "release" else "bicubic"
            return vision.encode_images(self.eva, images, self.device, self.dtype, resize).float().cpu()

    def encode(self, prompt, images: torch.Tensor | None = None, *, seed=0, temperature: float = 0.0,
               top_p: float = 1.0, max_new_tokens: int = 512, var_cfg_scale: float = 1.0,
               feature_slice: str = "official", force_image: bool = True, history=None,
               image_features: torch.Tensor | None = None, callback=None) -> WeGenCondition:
        """Prompt(s) (+ reference images, shared by every prompt) -> WeGenCondition with (B, 64, C) features.

        Args:
            prompt: one string or a list (a batch, decoded together with padding).
            images: (N, H, W, 3) reference images, inserted as image blocks before the instruction.
            seed: sampling seed (int: row b uses seed + b; or one per prompt). Ignored at temperature 0.
            temperature, top_p: text sampling; 0 is the release's greedy decoding.
            max_new_tokens: token budget (release: 512); counts text tokens only, or every generated token
                under preset="release" (as the release counts).
            var_cfg_scale: the release's var-cfg on the image-slot hidden states (1.0 = off).
            feature_slice: "official" (release) or "aligned" (extension, see mllm).
            force_image: append <img> so every row yields an image (extension).
            history: earlier prompting.Turn list; their image blocks need `image_features`.
            image_features: (n, 64, C) features for the image blocks of `history`, in order.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        rules.check_sampling(temperature, top_p, max_new_tokens)
        seeds = _seeds(seed, len(prompts))
        feats = self._block_features(images, image_features)
        n_images = 0 if images is None else images.shape[0]
        rows_ids = []
        for p in prompts:
            turns = list(history or []) + [prompting.Turn(user=p, user_images=n_images)]
            rows_ids.append(prompting.prompt_ids(self.tokenizer, turns, self.mllm_cfg.n_query, "generate",
                                                 force_image=force_image))
        settings = mllm.DecodeSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       var_cfg_scale=var_cfg_scale, feature_slice=feature_slice)
        results = self.generate_tokens(rows_ids, [feats] * len(prompts), settings, seeds, callback)
        missing = [i for i, r in enumerate(results) if r.features is None]
        if missing:
            raise RuntimeError(f"the model produced no image for prompt(s) {missing} within {max_new_tokens} tokens; "
                               f"enable force_image or raise max_new_tokens")
        features = torch.stack([r.features for r in results]).float().cpu()
        texts = [self.reply_text(r.ids) for r in results]
        return WeGenCondition(features, texts, prompts, dict(seeds=seeds, temperature=temperature, top_p=top_p,
                                                             var_cfg_scale=var_cfg_scale, feature_slice=feature_slice,
                                                             force_image=force_image))

    def decode_pixels(self, cond, *, seed=0, steps: int = 50, cfg: float = 2.0, width: int | None = None,
                      height: int | None = None, reference: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, strength: float = 1.0, feather: int = 16,
                      callback=None) -> torch.Tensor:
        """WeGenCondition or (B, 64, C) features -> (B, H, W, 3) images: UNet denoising + VAE decode.

        Release: 50 steps, cfg 2 or 7, 1024 px, strength 1. seed: int (row b uses seed + b) or one per row.
        width/height: default the UNet's size. Extension (consistency): `reference` (1 or B, H, W, 3) starts
        the latents from it at `strength` < 1; `mask` ((B, H, W), 1 = edit, > rules.EDIT_THRESHOLD) keeps
        everything outside mask + `feather` pixels bit-identical to the reference."""
        features = cond.features if isinstance(cond, WeGenCondition) else cond
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or \
                features.shape[1:] != (self.mllm_cfg.n_gen_tokens, self.mllm_cfg.feature_dim):
            raise ValueError(f"features must be (B, {self.mllm_cfg.n_gen_tokens}, {self.mllm_cfg.feature_dim}), got "
                             f"{tuple(getattr(features, 'shape', ()))}")
        rules.check_finite(features, "features (cond)")
        if mask is not None:
            rules.check_finite(mask, "mask")
        width = width or self.decoder_cfg.default_size
        height = height or self.decoder_cfg.default_size
        if reference is not None:
            check_images(reference, "reference")
        seeds = _seeds(seed, features.shape[0])
        with self.lock, torch.inference_mode(), self._using(self.unet, self.vae):
            return decoder.generate(self.unet, self.vae, self.scheduler, self.decoder_cfg, features, seeds,
                                    steps=steps, guidance_scale=cfg, width=width, height=height,
                                    reference=reference, mask=mask, strength=strength, feather=feather,
                                    callback=callback, noise="device" if self.preset == "release" else "cpu")

    def generate(self, prompt, images=None, *, seed=0, steps: int = 50, cfg: float = 2.0, width=None, height=None,
                 callback=None, **encode_kwargs):
        """encode + decode_pixels: returns (images (B, H, W, 3), WeGenCondition)."""
        rules.check_decode_args(steps, cfg, 1.0)
        rules.check_size(width or self.decoder_cfg.default_size, height or self.decoder_cfg.default_size)
        cond = self.encode(prompt, images, seed=seed, callback=callback, **encode_kwargs)
        return self.decode_pixels(cond, seed=seed, steps=steps, cfg=cfg, width=width, height=height,
                           callback=callback), cond

    def understand(self, images: torch.Tensor, question: str, *, max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, callback=None) -> str:
        """(N, H, W, 3) images + question -> reply text (no image is generated)."""
        check_images(images)
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        rules.check_sampling(temperature, top_p, max_new_tokens)
        feats = self._block_features(images, None)
        turns = [prompting.Turn(user=question, user_images=images.shape[0])]
        ids = prompting.prompt_ids(self.tokenizer, turns, self.mllm_cfg.n_query, "chat")
        settings = mllm.DecodeSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       allow_image=False)
        result = self.generate_tokens([ids], [feats], settings, _seeds(seed, 1), callback)[0]
        return self.reply_text(result.ids)

    def reconstruct(self, images: torch.Tensor, *, seed=0, steps: int = 50, cfg: float = 2.0, width=None,
                    height=None, callback=None) -> torch.Tensor:
        """(B, H, W, 3) -> EVA -> 4x4 pool -> UNet -> (B, H', W', 3): the detokenizer's sanity path."""
        rules.check_decode_args(steps, cfg, 1.0)
        rules.check_size(width or self.decoder_cfg.default_size, height or self.decoder_cfg.default_size)
        return self.decode_pixels(self.encode_images(images), seed=seed, steps=steps, cfg=cfg, width=width,
                           height=height, callback=callback)

    # Helpers -------------------------------------------------------------------------------------

    def _block_features(self, images, image_features):
        """Features of every image block in prompt order: history blocks first, then the new images."""
        parts = []
        if image_features is not None:
            parts.append(image_features.float())
        if images is not None:
            parts.append(self.encode_images(check_images(images)))
        return torch.cat(parts) if parts else None

    # Token generation for callers that build their own prompts (chat, rewrite, bench) ---------------

    def generate_tokens(self, rows_ids: list[list[int]], rows_features: list, settings: mllm.DecodeSettings,
                        seeds: list[int], callback=None, *, prefix: mllm.Prefix | None = None,
                        keep_prompt_cache: bool = False) -> list[mllm.RowResult]:
        """The LLM's token generation (prefill + one token per step, rows batched) -> one mllm.RowResult per row.

        Args:
            rows_ids: prompt token ids per row (prompting.prompt_ids), image slots included.
            rows_features: per row, the (n_blocks, 64, C) features of its image blocks in prompt order, or None.
            settings: mllm.DecodeSettings (token budget, sampling, var-cfg, feature slice, allow_image).
            seeds: one per row: row b samples from torch.Generator("cpu").manual_seed(seeds[b]).
            prefix: B=1 only: an mllm.Prefix whose KV cache already holds the prompt's first tokens
                (e.g. from engine.prefix_cache.lookup); keep_prompt_cache: return the prompt's KV cache in
                RowResult.prompt_cache (to store in engine.prefix_cache for the next turn).
        A RowResult holds the generated `ids`, the (64, C) image `features` (None when no image was made)
        and `prompt_cache`. Turn ids into text with reply_text.
        """
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        if self.preset == "release":  # the release's max_new_tokens counts every generated token
            settings = dataclasses.replace(settings, count_all_tokens=True)
        with self.lock, torch.inference_mode(), self._using(self.mllm):
            return mllm.decode(self.mllm, rows_ids, rows_features, self.image_ids, settings, self.tokenizer.eos_id,
                               generators, callback, prefix=prefix, keep_prompt_cache=keep_prompt_cache)

    def reply_text(self, ids: list[int]) -> str:
        """Generated ids -> text without the image block (release: regex strips every <...> tag)."""
        image_like = {self.image_ids.start, self.image_ids.end, *self.image_ids.slots}
        return prompting.clean_reply(self.tokenizer.decode([i for i in ids if i not in image_like]))


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _all_on(module: torch.nn.Module, device: torch.device) -> bool:
    """Every parameter and buffer already on the CPU `device` (a walk of .to() would change nothing)."""
    return device.type == "cpu" and all(t.device.type == "cpu" for t in (*module.parameters(), *module.buffers()))


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """nn.Module.to(dtype), skipping diffusers' keep-in-fp32 warning (these UNet/VAE keep none); no walk when
    every floating tensor already has that dtype."""
    tensors = (*module.parameters(), *module.buffers())
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return module
    return torch.nn.Module.to(module, dtype)

