"""The toy WeGen's architecture: the release's structure at widths a 2-core CPU can train.

EVA-style post-norm tower at 64 px with 8 px patches (an 8x8 grid, so the 4x4 pool of the release
becomes a stride-1 pool: still 64 tokens), Llama with SEED-X's 330 added tokens, an SDXL-style UNet
with the text_time embedding on an 8x8x4 latent, an 8x VAE, and a sentencepiece tokenizer trained on
the shapes world's words. The scheduler is SDXL's Euler config with prediction_type="sample"
(x0-prediction converges far faster on small data; TOYWORLD.md); the engine honours it.
"""
from __future__ import annotations

import random

from .. import toyworld as W
from ..prompting import GENERATE_PREFIX
from ..rewrite import DEFAULT_TEMPLATE, build_request
from ..tiny import SDXL_SCHEDULER, train_tokenizer
from ..vision import EvaConfig

IMAGE_SIZE = W.CANVAS  # the tower reads the world's 64 px pictures as they are (no resize)
EVA_TOY = EvaConfig(image_size=IMAGE_SIZE, patch_size=8, width=64, layers=3, head_width=32, mlp_dim=128)
LLAMA_TOY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=192, intermediate_size=384,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, hidden_act="silu",
                 max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 tie_word_embeddings=False, rope_theta=10000.0, initializer_range=0.02)
UNET_TOY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 128],
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
                cross_attention_dim=EVA_TOY.width, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + EVA_TOY.width,
                norm_num_groups=16)
# norm_num_groups=1: with one channel per group, GroupNorm would erase each channel's mean, which is exactly the
# flat background's colour (measured: background read at chance after 400 steps); one group keeps it.
VAE_TOY = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=1,
               block_out_channels=[8, 16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, sample_size=IMAGE_SIZE, scaling_factor=1.0,
               force_upcast=True)  # scaling_factor is measured after VAE training (1 / latent std)
SCHEDULER_TOY = dict(SDXL_SCHEDULER, prediction_type="sample")
SP_VOCAB_TOY = 640  # 256 byte-fallback pieces + the characters + whole words of the world
# What the CLI and the nodes use for this checkpoint unless told otherwise (stored in wegen_config.json).
# feature_slice "aligned": the toy is trained as the release trains (slot k's feature is regressed from the
# hidden state one position earlier), so the release's inference slice would hand the UNet features 1..63 + one
# untrained vector; see wegen/mllm.py.
RECOMMENDED = {"steps": 20, "cfg": 2.0, "width": IMAGE_SIZE, "height": IMAGE_SIZE, "feature_slice": "aligned"}


def tokenizer_corpus(seed: int) -> list[str]:
    """Every kind of sentence the toy sees: descriptions, partials, edits, questions, the prompt templates."""
    rng = random.Random(seed)
    scenes = W.all_scenes()
    lines = [W.describe(s) for s in scenes]
    lines += [W.describe(W.random_partial(rng, rng.choice(scenes))) for _ in range(2000)]
    lines += [W.edit_instruction(a, v) for a in W.ATTRIBUTES for v in W.CHOICES[a]] * 10
    lines += ["[INST] " + GENERATE_PREFIX + W.describe(rng.choice(scenes)) + " [/INST]" for _ in range(300)]
    lines += [build_request(DEFAULT_TEMPLATE, W.describe(W.random_partial(rng, rng.choice(scenes))))
              for _ in range(300)]
    lines += [W.QUESTION] * 50
    return lines


def train_toy_tokenizer(folder: str, seed: int = 0) -> int:
    """Write the toy's tokenizer (sentencepiece + SEED-X added tokens) into `folder`; returns the vocab size."""
    return train_tokenizer(folder, seed, corpus=tokenizer_corpus(seed), vocab_size=SP_VOCAB_TOY)
