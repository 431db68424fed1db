"""The trained toy modules -> the converted checkpoint layout (what `python -m wegen convert` writes).

fp16 safetensors, 64-byte aligned (loading.save_aligned_safetensors), `wegen_config.json` with the
architecture, the four YAML-only constants of the release at the toy's values, and two extensions:
`recommended` (steps, cfg, size, feature slice: the CLI's and the nodes' defaults for this checkpoint)
and `card` (how it was trained).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

import torch

from .. import loading
from ..prompting import WeGenTokenizer
from .stage1 import new_unet
from .stage2 import new_mllm
from .tower import new_tower, new_vae
from .toymodel import EVA_TOY, LLAMA_TOY, RECOMMENDED, SCHEDULER_TOY, VAE_TOY


def _fp16(module: torch.nn.Module) -> dict:
    return {k: (v.half() if v.is_floating_point() else v) for k, v in module.state_dict().items()}


def export(out: str, dst: str, steps: dict | None = None, seed: int = 0, recommended: dict | None = None) -> str:
    """OUT's finished stages -> `dst` (converted layout). Returns dst.

    The card (`source`) records the steps each exported stage was saved at (read from its checkpoint, so an
    export run on its own, or of a stage stopped early, says what was really trained); `steps`, when given,
    the steps the recipe asked for (`recipe_steps`).
    """
    tokenizer = WeGenTokenizer(os.path.join(out, "tokenizer"))
    tower, vae, unet = new_tower(torch.Generator()), new_vae(), new_unet()
    mllm = new_mllm(tokenizer.vocab_size)
    # the VAE: its decoder fine-tune when that stage ran (the encoder inside is the vae stage's, unchanged)
    vae_stage = "vae_decoder" if os.path.isfile(os.path.join(out, "vae_decoder.pt")) else "vae"
    trained = {stage: _load(os.path.join(out, f"{stage}.pt"), {key: module})
               for stage, key, module in (("tower", "tower", tower), (vae_stage, "vae", vae),
                                          ("stage1", "unet", unet), ("stage2", "mllm", mllm))}
    bank = torch.load(os.path.join(out, "latents.pt"), map_location="cpu")
    os.makedirs(os.path.join(dst, "tokenizer"), exist_ok=True)
    for name in os.listdir(tokenizer.folder):
        shutil.copy2(os.path.join(tokenizer.folder, name), os.path.join(dst, "tokenizer", name))
    for name, module in zip(loading.CONVERTED_FILES, (tower, mllm, unet, vae)):
        loading.save_aligned_safetensors(_fp16(module), os.path.join(dst, name))
    vae_config = {"_class_name": "AutoencoderKL", **_plain(vae.config), "scaling_factor": bank["scaling_factor"]}
    config = {"format": "wegen-converted", "version": 1,
              "constants": {"n_query_tokens": EVA_TOY.n_query, "n_gen_tokens": 64,
                            "eva_head_width": EVA_TOY.head_width, "image_size": EVA_TOY.image_size},
              "eva": asdict(EVA_TOY), "llama": dict(LLAMA_TOY, vocab_size=tokenizer.vocab_size),
              "unet": {"_class_name": "UNet2DConditionModel", **_plain(unet.config)}, "vae": vae_config,
              "scheduler": SCHEDULER_TOY,
              "source": {"layout": "trained", "recipe": "python -m wegen train-toy", "seed": seed,
                         "steps": trained, **({"recipe_steps": dict(steps)} if steps else {})},
              "recommended": dict(recommended or RECOMMENDED)}
    assert vae_config["latent_channels"] == VAE_TOY["latent_channels"]
    with open(os.path.join(dst, loading.CONVERTED_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1, default=str)
    return dst


def _load(path: str, modules: dict) -> int:
    """A stage checkpoint's weights into `modules`; returns the step it was saved at."""
    data = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
    for key, module in modules.items():
        module.load_state_dict(data["modules"][key])
    return int(data["step"])


def _plain(config) -> dict:
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=list))
