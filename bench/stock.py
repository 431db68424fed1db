"""The "stock" path: a stand-in for how the release runs, built from the engine's own modules.

Follows the release's `src/eval/inference.py` with `llama2_var.py`'s VAR greedy search (transformers
generate: one eager LlamaForCausalLM forward per token with a DynamicCache at batch 1, every step
returning logits over the whole vocabulary and all hidden states, the image-token processor run on
those logits, a host sync per token for the stopping check) and diffusers' StableDiffusionXLPipeline
(eager UNet in NCHW, uncond + cond batched, EulerDiscreteScheduler.step, latents kept in the UNet's
dtype, fp32 VAE decode because of force_upcast). A sweep is K sequential batch-1 turns; a chat turn
re-encodes every past image with EVA and re-prefills the whole conversation; loading reads the
official pickles. Conservative where the release is slower: the fp32 VAE copy is made once here,
while the pipeline up- and down-casts the VAE on every call.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from wegen import decoder, loading, mllm, prompting, vision


@dataclass
class StockModel:
    mllm: torch.nn.Module  # shared with the engine (the stock path never changes it)
    unet: torch.nn.Module  # own NCHW copy (a CUDA engine's UNet is channels-last)
    vae32: torch.nn.Module  # own float32 NCHW copy (the engine's VAE is channels-last)
    scheduler: object  # own EulerDiscreteScheduler (it keeps a step index)
    cfg: decoder.DecoderConfig
    image_ids: prompting.ImageTokenIds
    device: torch.device
    dtype: torch.dtype


def from_engine(engine) -> StockModel:
    """Stock copies of the engine's decoder modules (NCHW, fp32 VAE); the LLM and EVA are shared."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = copy.deepcopy(engine.unet).to(memory_format=torch.contiguous_format)
    unet.set_attn_processor(AttnProcessor2_0())  # the pipeline's SDPA everywhere (no ZeroContextSkip)
    vae32 = torch.nn.Module.to(copy.deepcopy(engine.vae), torch.float32).to(memory_format=torch.contiguous_format)
    for m in (unet, vae32):
        m.to(engine.device)
    scheduler = EulerDiscreteScheduler.from_config(engine.scheduler.config)
    return StockModel(engine.mllm, unet, vae32, scheduler, engine.decoder_cfg, engine.image_ids, engine.device,
                      engine.dtype)


# MLLM: the release's VAR greedy search ------------------------------------------------------------

def _forward(llm, embeds, mask, positions, cache):
    """LlamaForCausalLM forward as generate runs it: logits over the vocabulary and every hidden state."""
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
              output_hidden_states=True, **mllm.cache_kwargs(llm.model, cache))
    return out.hidden_states[-1][:, -1], out.logits[:, -1].float()  # (1, H), (1, V)


def _processed_token(logits, prev: int, image_ids) -> int:
    """The release's logits processor: image ids masked in text mode; a forced id gets max + 10; argmax."""
    scores = mllm.mask_image_ids(logits, image_ids, allow_image=True)
    forced = mllm.forced_next(prev, image_ids)
    if forced is not None:
        scores[..., forced] = scores.max() + 10
    return int(scores.argmax(-1))  # generate syncs on every token (stopping criteria)


def decode_image_tokens(sm: StockModel, ids: list[int], features=None) -> torch.Tensor:
    """Prompt ids ending with <img> -> (64, C) float32 CPU features, one eager forward per token (B=1)."""
    m, image_ids = sm.mllm, sm.image_ids
    with torch.inference_mode():
        embeds, mask, positions = mllm.build_prefill(m, [ids], [features], image_ids, sm.device, sm.dtype)
        cache = mllm.new_cache(m.llm)
        h, logits = _forward(m.llm, embeds, mask, positions, cache)
        hidden, prev, pos = [h], ids[-1], int(positions[0, -1]) + 1
        while True:
            token = _processed_token(logits, prev, image_ids)
            if token == image_ids.end or token not in image_ids.slots:
                break
            x = m.feedback_embedding(h)[:, None]  # (1, 1, H): in_proj(out_proj(h))
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype, device=sm.device)], dim=1)
            h, logits = _forward(m.llm, x, mask, torch.tensor([[pos]], device=sm.device), cache)
            hidden.append(h)
            prev, pos = token, pos + 1
        hs = torch.cat(hidden)  # (65, H): <img>, <img_0> .. <img_63>
        return m.output_resampler(hs[1:]).float().cpu()


# Decoder: the SDXL pipeline's loop and VAE decode ---------------------------------------------------

def denoise(sm: StockModel, features: torch.Tensor, seed: int, steps: int, guidance_scale: float,
            width: int, height: int) -> torch.Tensor:
    """(1, 64, C) features -> (1, 4, h, w) latents, as StableDiffusionXLPipeline.__call__ loops."""
    unet, sched, cfg, dev = sm.unet, sm.scheduler, sm.cfg, sm.device
    dtype = next(unet.parameters()).dtype
    with torch.inference_mode():
        ctx = features.to(dev, dtype)
        pooled = ctx.mean(dim=1)
        time_ids = decoder.sdxl_time_ids(height, width, 1, dev, dtype)
        prompt_embeds = torch.cat([torch.zeros_like(ctx), ctx])
        added = {"text_embeds": torch.cat([torch.zeros_like(pooled), pooled]), "time_ids": torch.cat([time_ids] * 2)}
        sched.set_timesteps(steps, device=dev)
        shape = (cfg.latent_channels, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor)
        latents = (decoder.initial_noise([seed], shape).to(dev) * sched.init_noise_sigma).to(dtype)
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([latents] * 2), t)
            eps = unet(x_in, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
        return latents


def vae_decode(sm: StockModel, latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) -> (B, H, W, 3) float32 CPU images with the fp32 VAE (force_upcast)."""
    with torch.inference_mode():
        pixels = sm.vae32.decode(latents.float() / sm.cfg.scaling_factor, return_dict=False)[0]
        return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()


def full_turn(sm: StockModel, ids: list[int], seed: int, steps: int, guidance_scale: float, width: int,
              height: int) -> torch.Tensor:
    """Prompt ids -> one image (1, H, W, 3): decode, denoise, VAE."""
    features = decode_image_tokens(sm, ids)[None]
    return vae_decode(sm, denoise(sm, features, seed, steps, guidance_scale, width, height))


def sweep(sm: StockModel, rows_ids: list[list[int]], seeds: list[int], steps: int, guidance_scale: float,
          width: int, height: int) -> torch.Tensor:
    """K prompts -> K images, as K sequential batch-1 turns (the release has no batched path)."""
    return torch.cat([full_turn(sm, ids, s, steps, guidance_scale, width, height) for ids, s in zip(rows_ids, seeds)])


def chat_turn(sm: StockModel, eva, ids: list[int], past_images: torch.Tensor) -> torch.Tensor:
    """Turn N without memory: EVA on every past image, then the whole conversation prefilled and decoded."""
    with torch.inference_mode():
        feats = vision.encode_images(eva, past_images, sm.device, sm.dtype)  # (n, 64, C)
    return decode_image_tokens(sm, ids, feats)


def load_official(root: str, device, dtype) -> tuple[loading.LoadedParts, dict]:
    """The release's loading: every pickle (stage 2, then final) read, every module built (EVA included),
    tokenizer and scheduler: (parts, {"mllm", "unet", "vae", "eva", "tokenizer", "scheduler"})."""
    parts = loading.load_parts(root)
    rep = parts.report
    modules = {"mllm": loading.build_mllm(parts.mllm_cfg, parts.llama_config, parts.mllm_state, rep),
               "unet": loading.build_unet(parts.unet_config, parts.unet_state, rep),
               "vae": loading.build_vae(parts.vae_config, parts.vae_state, rep),
               "eva": loading.build_eva(parts.eva_cfg, parts.eva_state, rep)}
    for name, m in modules.items():
        torch.nn.Module.to(m, device=device, dtype=torch.float32 if name == "vae" else dtype)
    modules["tokenizer"] = prompting.WeGenTokenizer(parts.tokenizer_dir)  # the release loads these two as well
    modules["scheduler"] = loading.build_scheduler(parts.scheduler_config)
    return parts, modules


def from_modules(parts: loading.LoadedParts, modules: dict, device, dtype) -> StockModel:
    """A StockModel over freshly loaded modules (the peak-memory child)."""
    return StockModel(modules["mllm"], modules["unet"], modules["vae"], modules["scheduler"], parts.decoder_cfg,
                      modules["tokenizer"].image_token_ids(parts.mllm_cfg.n_gen_tokens), torch.device(device), dtype)
