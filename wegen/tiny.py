"""`make-tiny`: a random-weight WeGen in the official `wegen_mllm_ckpt/` layout, for tests and the demo.

Same structure as the release (EVA post-norm tower at 448 px with head width 112, Llama with the
330 SEED-X added tokens, SDXL-style UNet with 112-d context and text_time embedding, 8x VAE),
small widths and depths, a sentencepiece tokenizer trained on the spot. Deterministic for a seed.
Its images are noise: it proves the machinery; real weights make real pictures.
"""
from __future__ import annotations

import io
import json
import os
import random

import torch

from . import loading as L
from .mllm import MllmConfig
from .prompting import seedx_added_tokens
from .vision import EvaConfig

EVA_TINY = EvaConfig(image_size=448, patch_size=14, width=112, layers=2, head_width=112, mlp_dim=224)
LLAMA_TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, hidden_act="silu",
                  max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False, rope_theta=10000.0)
UNET_TINY = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
                 cross_attention_dim=112, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 112, norm_num_groups=32)
VAE_TINY = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                block_out_channels=[16, 16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, sample_size=256, scaling_factor=0.13025, force_upcast=True)
# The SDXL-base scheduler config (facts from stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json).
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
SP_VOCAB = 600

_WORDS = ("a the of and with in on at by for from under over near an painting photo picture image drawing "
          "portrait landscape city street river mountain forest ocean sky sunset sunrise night day morning "
          "cat dog bird horse fox owl fish dragon robot castle house tower bridge boat car train garden flower "
          "tree rose tulip red blue green yellow orange purple black white golden silver bright dark soft warm "
          "cold foggy rainy snowy sunny cozy quiet busy old new tiny huge small large cute happy sad calm wild "
          "style oil watercolor sketch pencil digital art cinematic lighting detailed realistic dreamy vintage "
          "generate make draw show describe what is this color how many keep same but change add remove make it "
          "more less background foreground left right center top bottom wearing holding sitting standing running "
          "flying swimming reading hat scarf glasses coat umbrella book cup table window door lamp moon star "
          "cloud rain snow wind fire water stone wood glass metal paper here's here is 0 1 2 3 4 5 6 7 8 9").split()


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) for _ in range(3000)]
    lines += ["[INST] Generate a painting: " + " ".join(rng.choice(_WORDS) for _ in range(6)) + " [/INST]"
              for _ in range(300)]
    lines += ["Here's a painting.", "Describe this image.", "What is in the picture?"] * 20
    return lines


def train_tokenizer(folder: str, seed: int, corpus: list[str] | None = None, vocab_size: int = SP_VOCAB):
    """Llama-style BPE sentencepiece model (byte fallback, unk/bos/eos = 0/1/2) + SEED-X's 330 added tokens.

    `corpus` defaults to the tiny checkpoint's random word soup; the toy WeGen passes the shapes world's words.
    """
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    model = io.BytesIO()  # in memory: no temp path ends up inside the model's trainer spec
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus if corpus is not None else _corpus(seed)), model_writer=model,
        vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, num_threads=1, minloglevel=2, shuffle_input_sentence=False)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    added = {tok: vocab_size + i for i, tok in enumerate(seedx_added_tokens())}
    _write_json(os.path.join(folder, "added_tokens.json"), added)
    _write_json(os.path.join(folder, "special_tokens_map.json"),
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    _write_json(os.path.join(folder, "tokenizer_config.json"),
                {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
                 "model_max_length": 4096, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return vocab_size + len(added)


def _write_json(path: str, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def random_state(module: torch.nn.Module, generator: torch.Generator, dtype=torch.float32,
                 std: float | None = None) -> dict:
    """Seeded random tensors for every state-dict entry: norms 1, biases 0, weights N(0, std or 1/fan_in).

    The LLM uses std 0.02 (transformers' initializer_range): with 1/fan_in its random VAR feed-back
    loop amplifies rounding differences over the 64 image slots, which would hide real bugs in tests.
    """
    state = {}
    for name, t in module.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith("bias"):
            value = torch.zeros(shape)
        elif ("norm" in name or name.endswith("ln.weight")) and len(shape) == 1:
            value = torch.ones(shape)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else shape[0]
            scale = std or (0.02 if (len(shape) > 1 and shape[0] == 1) else fan_in ** -0.5)
            value = torch.randn(shape, generator=generator) * scale
        state[name] = value.to(dtype)
    return state


def make_tiny(folder: str, seed: int = 0) -> str:
    """Write a tiny random-weight checkpoint in the official layout into `folder`; returns it."""
    from safetensors.torch import save_file

    root = os.path.abspath(folder)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise L.CheckpointError(f"cannot create {root}: {e}") from e
    g = torch.Generator("cpu").manual_seed(seed)

    vocab = train_tokenizer(os.path.join(root, L.TOKENIZER_DIR), seed)
    llama_dir = os.path.join(root, L.LLAMA_DIR)
    os.makedirs(llama_dir, exist_ok=True)
    # pre-resize, as released
    _write_json(os.path.join(llama_dir, "config.json"), dict(LLAMA_TINY, vocab_size=SP_VOCAB))

    eva = L.build_eva(EVA_TINY)
    os.makedirs(os.path.dirname(os.path.join(root, L.EVA_FILE)), exist_ok=True)
    torch.save(random_state(eva, g), os.path.join(root, L.EVA_FILE))

    mllm_cfg = MllmConfig(hidden=LLAMA_TINY["hidden_size"], feature_dim=EVA_TINY.width)
    mllm = L.build_mllm(mllm_cfg, dict(LLAMA_TINY, vocab_size=vocab))
    stage2 = random_state(mllm, g, std=0.02)
    final = random_state(mllm, g, std=0.02)  # stage 3 overrides stage 2 everywhere it has a key
    for sd in (stage2, final):
        sd["input_resampler.avgpoolquery.scale"] = torch.ones(1)
        sd["adapter.resampler.scale"] = torch.ones(1)
        for i in range(LLAMA_TINY["num_hidden_layers"]):  # the release's transformers 4.30 saved these
            sd[f"llm.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    for rel, sd in ((L.STAGE2_FILE, stage2), (L.FINAL_FILE, final)):
        os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
        torch.save(sd, os.path.join(root, rel))

    unet = L.build_unet(UNET_TINY)
    unet_dir = os.path.join(root, L.UNET_DIR)
    os.makedirs(unet_dir, exist_ok=True)
    _write_json(os.path.join(unet_dir, "config.json"), _diffusers_config(unet, "UNet2DConditionModel"))
    save_file(random_state(unet, g, torch.bfloat16), os.path.join(unet_dir, L.UNET_FILE))

    vae = L.build_vae(VAE_TINY)
    vae_dir = os.path.join(root, L.SDXL_DIR, "vae")
    os.makedirs(vae_dir, exist_ok=True)
    _write_json(os.path.join(vae_dir, "config.json"), _diffusers_config(vae, "AutoencoderKL"))
    save_file(random_state(vae, g), os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    sched_dir = os.path.join(root, L.SDXL_DIR, "scheduler")
    os.makedirs(sched_dir, exist_ok=True)
    _write_json(os.path.join(sched_dir, "scheduler_config.json"), SDXL_SCHEDULER)
    return root


def _diffusers_config(model, class_name: str) -> dict:
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg = json.loads(json.dumps(cfg, default=list))
    return {"_class_name": class_name, **cfg}
