"""`python -m wegen train-toy OUT [--stage ...] [--steps ...] [--device ...]`: the whole toy recipe, resumable.

Stages, in order (each skips what is already done in OUT, and resumes from its last save):
  tokenizer  sentencepiece on the world's words + SEED-X's added tokens     OUT/tokenizer/
  tower      the vision tower (EVA stand-in)                                OUT/tower.pt
  vae        the VAE (SDXL-VAE stand-in)                                    OUT/vae.pt
  bank       tower features of the world's scenes (+ jitter averages)       OUT/bank.pt
  latents    VAE latents of the bank's pictures, the VAE's scaling_factor  OUT/latents.pt
  diic       the DIIC stand-in: clips -> mined edit sequences              OUT/diic/
  stage1     the UNet detokenizer                                           OUT/stage1.pt
  vae_decoder the VAE's decoder sharpened, encoder (so stage 1's latents) frozen  OUT/vae_decoder.pt
  stage2     the MLLM                                                       OUT/stage2.pt
  export     the converted checkpoint (fp16 safetensors)                    OUT/wegen-toy/
stage2 needs the tower, the bank and the DIIC data; stage1 the bank and the latents (so the VAE): two
processes can run them at once (`--stage bank --stage diic --stage stage2` once the tower is done,
`--stage latents --stage stage1` once the VAE is), one core each.
"""
from __future__ import annotations

import logging
import os
import time

STAGES = ("tokenizer", "tower", "vae", "bank", "latents", "diic", "stage1", "vae_decoder", "stage2", "export")
# Steps of the shipped checkpoint's recipe (about two hours on a 2-core CPU in all).
DEFAULT_STEPS = {"tower": 1000, "vae": 1200, "stage1": 2400, "vae_decoder": 3400, "stage2": 3200}
DIIC_CLIPS = 2000

log = logging.getLogger(__name__)


def train_toy(out: str, stages=STAGES, steps: dict | None = None, device: str = "cpu", seed: int = 0,
              threads: int | None = None) -> str:
    """Run `stages` into folder `out`; returns the exported checkpoint folder (OUT/wegen-toy)."""
    import torch

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"--stage must be among {', '.join(STAGES)} (or 'all'), got {', '.join(unknown)}")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    steps = {**DEFAULT_STEPS, **(steps or {})}
    bad = {k: v for k, v in steps.items() if k not in DEFAULT_STEPS or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"--steps takes STAGE=N with STAGE in {', '.join(DEFAULT_STEPS)} and N >= 1, got {bad}")
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    log_file = os.path.join(out, "train.log")
    from . import export, stage1, stage2, tower
    from .toymodel import train_toy_tokenizer

    for stage in stages:
        t0 = time.time()
        if stage == "tokenizer":
            if not os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.model")):
                train_toy_tokenizer(os.path.join(out, "tokenizer"), seed)
        elif stage == "tower":
            tower.train_tower(out, steps["tower"], seed, log_file=log_file)
        elif stage == "vae":
            tower.train_vae(out, steps["vae"], seed, log_file=log_file)
        elif stage == "bank":
            tower.build_bank(out, seed)
        elif stage == "latents":
            tower.build_latents(out)
        elif stage == "diic":
            _diic(out, seed)
        elif stage == "stage1":
            stage1.train_unet(out, steps["stage1"], seed, device=device, log_file=log_file)
        elif stage == "vae_decoder":
            tower.train_vae_decoder(out, steps["vae_decoder"], seed, log_file=log_file)
        elif stage == "stage2":
            stage2.train_mllm(out, steps["stage2"], seed, device=device, log_file=log_file)
        elif stage == "export":
            export.export(out, os.path.join(out, "wegen-toy"), steps=steps, seed=seed)
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(f"stage {stage} done in {time.time() - t0:.0f} s\n")
    return os.path.join(out, "wegen-toy")


def _diic(out: str, seed: int):
    from .. import diic

    folder = os.path.join(out, "diic")
    if not os.path.isfile(os.path.join(folder, "sequences.jsonl")):
        diic.run(DIIC_CLIPS, folder, seed=seed)
