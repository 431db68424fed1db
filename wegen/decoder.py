"""Detokenizer: 64 image features -> SDXL-style UNet denoising loop -> VAE decode -> pixels.

Follows the release's `src/models/detokenizer/adapter_modules.py` (SDXLAdapter.generate), which runs
diffusers' StableDiffusionXLPipeline with the text encoders removed:
  context = the 64 features (B, 64, C), pooled = their mean (B, C), time ids [H, W, 0, 0, H, W],
  classifier-free guidance against all-zero context and pooled (use_neg: False), Euler with the
  SDXL scheduler config ("leading" spacing, steps_offset 1), VAE decode with an fp32 upcast when the
  VAE config says force_upcast. Initial noise: a seeded CPU generator in fp32 by default (an extension:
  the same picture on every GPU), or the release's device generator in the model dtype (noise="device").
The loop is written out here so progress, previews and interrupts attach to it, and so the
consistency extensions (reference latents + strength, edit mask, paste-back) can join it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fastpath
from .rules import EDIT_THRESHOLD, check_decode_args, check_size


@dataclass(frozen=True)
class DecoderConfig:
    context_dim: int = 1792  # UNet cross_attention_dim = EVA width
    latent_channels: int = 4
    vae_scale_factor: int = 8  # 2 ** (len(vae block_out_channels) - 1)
    default_size: int = 1024  # unet sample_size * vae_scale_factor
    scaling_factor: float = 0.13025  # SDXL VAE
    force_upcast: bool = True


# Step math: plain functions over tensors ---------------------------------------------------------

def euler_schedule(scheduler, steps: int):
    """(timesteps (steps,), sigmas (steps + 1,)) of the scheduler config; sigmas end with 0."""
    scheduler.set_timesteps(steps, device="cpu")
    return scheduler.timesteps.clone(), scheduler.sigmas.clone().float()


def init_noise_sigma(sigmas: torch.Tensor, spacing: str) -> float:
    """Noise scale of the first latents (diffusers EulerDiscreteScheduler.init_noise_sigma)."""
    s = float(sigmas.max())
    return s if spacing in ("linspace", "trailing") else math.sqrt(s * s + 1)


def scale_model_input(x, sigma: float):
    """Euler's input scaling: x / sqrt(sigma^2 + 1)."""
    return x / math.sqrt(sigma * sigma + 1)


def euler_step(x, eps, sigma: float, sigma_next: float):
    """One Euler step for an epsilon-predicting model (s_churn = 0): x + (sigma_next - sigma) * eps."""
    return x + (sigma_next - sigma) * eps


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # the scheduler config's prediction_type, as diffusers


def to_epsilon(output, x, sigma: float, prediction_type: str):
    """The UNet's output -> the noise it implies at latents `x` (noise level `sigma`), as diffusers' Euler step
    reads it.

    epsilon (the release's): unchanged. sample: x0 = output. v_prediction: x0 = x / (sigma^2 + 1) - output *
    sigma / sqrt(sigma^2 + 1). Then eps = (x - x0) / sigma.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "sample":
        x0 = output
    elif prediction_type == "v_prediction":
        x0 = x / (sigma * sigma + 1) - output * (sigma / math.sqrt(sigma * sigma + 1))
    else:
        raise ValueError(f"scheduler prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return (x - x0) / sigma


def cfg_mix(eps_uncond, eps_cond, scale: float):
    """Classifier-free guidance: uncond + scale * (cond - uncond), no rescale."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sdxl_time_ids(height: int, width: int, batch: int, device, dtype):
    """SDXL micro-conditioning at inference: [H, W, 0, 0, H, W] (original size, crop, target size)."""
    ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
    return ids.expand(batch, 6)


def feather_weight(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """(B, H, W) 0/1 edit mask -> (B, 1, H, W) blend weight: 1 on the mask, ramps to exactly 0 at `feather` px."""
    m = (mask > EDIT_THRESHOLD).float()[:, None]
    if feather <= 0:
        return m
    grow, blur = (feather + 1) // 2, feather // 2
    m = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
    if blur:
        m = F.avg_pool2d(m, 2 * blur + 1, stride=1, padding=blur, count_include_pad=False)
    return m.clamp(0, 1)


def paste_back(decoded: torch.Tensor, reference: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) blend; where weight == 0 the reference pixels are copied bit for bit."""
    w = weight[:, 0, :, :, None]  # (B, H, W, 1)
    return torch.where(w > 0, reference * (1 - w) + decoded * w, reference)


# The loop ----------------------------------------------------------------------------------------

NOISE_SOURCES = ("cpu", "device")


def initial_noise(seeds: list[int], shape: tuple, source: str = "cpu", device="cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, h, w) standard noise, one seeded generator per image (batch == singles).

    source="cpu" (default, an extension): float32 from a CPU generator, so a seed gives the same picture on
    every GPU (ComfyUI's convention). source="device" (the release): `torch.Generator(device).manual_seed(seed)`
    drawing in `dtype` on `device`, as diffusers' SDXL pipeline draws its latents (randn_tensor in the
    prompt embeddings' dtype); returned as float32.
    """
    if source not in NOISE_SOURCES:
        raise ValueError(f"noise source must be one of {NOISE_SOURCES}, got {source!r}")
    if source == "cpu":
        return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s)))
                          for s in seeds])
    device = torch.device(device)
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator(device).manual_seed(int(s)),
                                  device=device, dtype=dtype) for s in seeds]).float()


def generate(unet, vae, scheduler, cfg: DecoderConfig, features: torch.Tensor, seeds: list[int], *,
             steps: int = 50, guidance_scale: float = 2.0, width: int = 1024, height: int = 1024,
             reference: torch.Tensor | None = None, mask: torch.Tensor | None = None, strength: float = 1.0,
             feather: int = 16, callback=None, output: str = "images", noise: str = "cpu") -> torch.Tensor:
    """(B, 64, C) features -> (B, H, W, 3) float32 images in 0..1 on the CPU.

    noise: where the initial noise comes from (see initial_noise): "cpu" (default) or "device" (the release).

    output="latents" stops before the VAE and returns the (B, 4, h, w) float32 latents on the UNet's
    device (the bench times the denoising loop alone).

    Official path: reference=None, strength=1. Extension (consistency): `reference` (B, H, W, 3)
    starts the latents from the reference at `strength`; `mask` (B, H, W), 1 = edit, keeps latents
    outside it on the reference's noising path and pastes the reference pixels back outside
    mask + feather.
    """
    # 1) check inputs
    check_size(width, height)
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    check_decode_args(steps, guidance_scale, strength)
    B = features.shape[0]
    if len(seeds) != B:
        raise ValueError(f"need one seed per image: {B} feature sets, {len(seeds)} seeds")
    if mask is not None and reference is None:
        raise ValueError("mask needs a reference image: the area outside the mask is kept from the reference")
    if reference is not None:
        reference = _fit_batch(reference, B, "reference").float()
        if reference.shape[1:3] != (height, width):
            raise ValueError(f"reference is {reference.shape[2]}x{reference.shape[1]} but the output size is "
                             f"{width}x{height}; resize the reference or set width/height to match")
    if mask is not None:
        mask = _fit_batch(mask, B, "mask").float()
        if mask.shape[1:] != (height, width):
            mask = F.interpolate(mask[:, None], size=(height, width), mode="nearest")[:, 0]
    device, dtype = unet.device, unet.dtype
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    # 2) conditioning: cond = features, uncond = zeros; CFG batched as [uncond, cond]
    ctx = features.to(device=device, dtype=dtype)  # (B, 64, C)
    pooled = ctx.mean(dim=1)  # (B, C)
    time_ids = sdxl_time_ids(height, width, B, device, dtype)
    do_cfg = guidance_scale > 1.0  # the SDXL pipeline's rule
    if do_cfg:
        ctx = torch.cat([torch.zeros_like(ctx), ctx])
        pooled = torch.cat([torch.zeros_like(pooled), pooled])
        time_ids = torch.cat([time_ids, time_ids])
    added = {"text_embeds": pooled, "time_ids": time_ids}

    # 3) timesteps (img2img: skip the first (1 - strength) of the schedule)
    timesteps, sigmas = euler_schedule(scheduler, steps)
    start = 0
    if reference is not None and strength < 1.0:
        start = steps - min(int(steps * strength), steps)
        if start >= steps:
            raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
    timesteps, sigmas = timesteps[start:], sigmas[start:]

    # 4) initial latents
    shape = (cfg.latent_channels, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor)
    noise = initial_noise(seeds, shape, noise, device, dtype).to(device)
    ref_latents = latent_mask = weight = None
    if reference is not None:
        ref_latents = encode_latents(vae, cfg, reference).to(device)
    if mask is not None:
        weight = feather_weight(mask, feather)  # (B, 1, H, W)
        latent_mask = F.max_pool2d((weight > 0).float(), cfg.vae_scale_factor).to(device)
    spacing = scheduler.config.get("timestep_spacing", "leading")
    if ref_latents is not None and strength < 1.0:
        x = ref_latents + noise * float(sigmas[0])
    else:
        x = noise * init_noise_sigma(sigmas, spacing)
    x = x.float()

    # 5) denoising loop (fastpath: the UNet call is a replayed CUDA graph on GPUs, else the plain call)
    denoise = fastpath.unet_runner(unet, ctx, added, zero_rows=B if do_cfg else 0)
    for i, t in enumerate(timesteps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x_in = scale_model_input(x, sigma).to(dtype)
        if do_cfg:
            x_in = torch.cat([x_in, x_in])
        eps = denoise(x_in, t).float().contiguous()  # contiguous: a channels-last UNet returns NHWC strides
        if do_cfg:
            eps = cfg_mix(*eps.chunk(2), guidance_scale)
        eps = to_epsilon(eps, x, sigma, prediction_type)
        x = euler_step(x, eps, sigma, sigma_next)
        if latent_mask is not None:  # outside the mask: the reference on its own noising path
            x = latent_mask * x + (1 - latent_mask) * (ref_latents + noise * sigma_next)
        if callback is not None:
            callback({"stage": "denoise", "i": i + 1, "total": len(timesteps), "x": x})

    # 6) VAE decode (+ paste-back outside the mask)
    if output == "latents":
        return x
    images = decode_latents(vae, cfg, x)
    if weight is not None:
        images = paste_back(images, reference, weight)
    return images


def _fit_batch(t: torch.Tensor, B: int, name: str) -> torch.Tensor:
    if t.shape[0] == B:
        return t
    if t.shape[0] == 1:
        return t.expand(B, *t.shape[1:])
    raise ValueError(f"{name} batch is {t.shape[0]} but {B} images are decoded; give 1 or {B}")


def decode_latents(vae, cfg: DecoderConfig, latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) latents -> (B, H, W, 3) float32 0..1 on the CPU, in the VAE's own dtype.

    The engine keeps an fp16 VAE with force_upcast in fp32 (the release's pipeline upcasts for decode).
    """
    pixels = vae.decode(latents.to(vae.dtype) / cfg.scaling_factor).sample  # (B, 3, H, W) in -1..1
    return (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def encode_latents(vae, cfg: DecoderConfig, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) 0..1 -> (B, 4, h, w) scaled latents (distribution mean: deterministic)."""
    x = (images.permute(0, 3, 1, 2) * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    return vae.encode(x).latent_dist.mean.float() * cfg.scaling_factor
