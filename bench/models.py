"""The models the bench times: the tiny checkpoint, or random weights at the release's official dimensions.

Official dimensions (shared/reference/wegen-official-architecture.md, sections 1.2-1.5 and 5):
Llama-2-7B (4096 hidden, 32 layers, 11008 MLP) with the vocabulary resized to 32330, EVA-CLIP-E/14+
at 448 px (width 1792, 64 blocks, MLP 15360), the SDXL-base UNet with a 1792-d context and a 3328-d
add-embedding input, and the SDXL VAE. Full-size modules are built on the meta device and filled
with random values generated directly on the target device (never a 27 GB CPU init); the text
tokenizer is the tiny one, with the 330 added tokens placed at 32000.. as in the release.
"""
from __future__ import annotations

import json
import os

import torch

from wegen import decoder, loading, mllm, tiny, vision

LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                 max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 tie_word_embeddings=False, rope_theta=10000.0, vocab_size=32330)
# stable-diffusion-xl-base-1.0/unet/config.json with the WeGen stage-1 changes: 1792-d context, 6 * 256 + 1792.
SDXL_UNET = dict(act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
                 addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                 cross_attention_dim=1792, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"],
                 in_channels=4, layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5,
                 norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=3328, sample_size=128,
                 transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                                          "UpBlock2D"],
                 use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0)
# stable-diffusion-xl-base-1.0/vae/config.json
SDXL_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                force_upcast=True, in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                out_channels=3, sample_size=1024, scaling_factor=0.13025, up_block_types=["UpDecoderBlock2D"] * 4)
OFFICIAL_VOCAB = 32000  # Llama-2's sentencepiece size; the 330 added tokens follow


def tiny_checkpoints(root: str) -> tuple[str, str]:
    """(official layout, converted layout) of the tiny checkpoint under `root`, written once and reused."""
    official = os.path.join(root, "tiny")
    converted = os.path.join(root, "tiny-converted")
    if not os.path.isfile(os.path.join(official, loading.FINAL_FILE)):
        tiny.make_tiny(official, seed=0)
    if not os.path.isfile(os.path.join(converted, loading.CONVERTED_CONFIG)):
        loading.convert(official, converted)
    return official, converted


def full_tokenizer(folder: str) -> str:
    """The tiny sentencepiece model with SEED-X's 330 added tokens at 32000.. (vocab 32330, as released)."""
    if not os.path.isfile(os.path.join(folder, "tokenizer.model")):
        tiny.train_tokenizer(folder, seed=0)
        from wegen.prompting import seedx_added_tokens

        added = {tok: OFFICIAL_VOCAB + i for i, tok in enumerate(seedx_added_tokens())}
        with open(os.path.join(folder, "added_tokens.json"), "w", encoding="utf-8") as f:
            json.dump(added, f)
    return folder


def random_state(module: torch.nn.Module, device, dtype, generator: torch.Generator, std: float | None = None) -> dict:
    """Random tensors for every entry of a meta module's state dict, made on `device` (wegen.tiny's rule:
    norms 1, biases 0, weights N(0, std or 1/sqrt(fan_in)), position/class embeddings N(0, 0.02))."""
    state = {}
    for name, t in module.state_dict().items():
        shape = tuple(t.shape)
        value = torch.empty(shape, device=device, dtype=dtype)
        if name.endswith("bias"):
            value.zero_()
        elif ("norm" in name or name.endswith("ln.weight")) and len(shape) == 1:
            value.fill_(1.0)
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            scale = std or (0.02 if (len(shape) > 1 and shape[0] == 1) else max(1, fan_in) ** -0.5)
            value.normal_(0.0, scale, generator=generator)
        state[name] = value
    return state


def full_parts(workdir: str, device, dtype=torch.bfloat16, seed: int = 0, mini: bool = False) -> loading.LoadedParts:
    """LoadedParts with random weights on `device` at the official dimensions (EVA: see eva_state).

    mini=True keeps every other choice (vocab 32330, the tokenizer, the code path) at the tiny checkpoint's
    widths, so the full-size harness can be checked on a CPU.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    if mini:
        eva_cfg, llama, unet_cfg, vae_cfg = tiny.EVA_TINY, dict(tiny.LLAMA_TINY, vocab_size=32330), tiny.UNET_TINY, \
            tiny.VAE_TINY
        mllm_cfg = mllm.MllmConfig(hidden=llama["hidden_size"], feature_dim=eva_cfg.width)
        dec_cfg = decoder.DecoderConfig(context_dim=eva_cfg.width, default_size=256)
    else:
        eva_cfg, llama, unet_cfg, vae_cfg = vision.EvaConfig(), LLAMA2_7B, SDXL_UNET, SDXL_VAE
        mllm_cfg, dec_cfg = mllm.MllmConfig(), decoder.DecoderConfig()
    mllm_state = random_state(loading.build_mllm(mllm_cfg, llama), device, dtype, gen, std=0.02)
    unet_state = random_state(loading.build_unet(unet_cfg), device, dtype, gen)
    vae_state = random_state(loading.build_vae(vae_cfg), device, dtype, gen)
    what = "tiny" if mini else "the official"
    report = loading.LoadReport("random", f"random weights at {what} dimensions (seed {seed})")
    return loading.LoadedParts(full_tokenizer(os.path.join(workdir, "tokenizer-32330")), eva_cfg, mllm_cfg, dec_cfg,
                               dict(llama), dict(unet_cfg), dict(vae_cfg), dict(tiny.SDXL_SCHEDULER),
                               None, mllm_state, unet_state, vae_state, report)


def eva_state(cfg: vision.EvaConfig, device, dtype=torch.bfloat16, seed: int = 1) -> dict:
    """Random EVA weights (4.35 B parameters at EVA-E/14+) on `device`; made only when a figure needs EVA."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return random_state(loading.build_eva(cfg), device, dtype, gen)


def param_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())
