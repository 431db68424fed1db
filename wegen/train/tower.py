"""Stage 0 (toy only): the vision tower and the VAE, then the feature/latent bank the later stages read.

The real model takes both from elsewhere (EVA-CLIP-E, SDXL's VAE). Here:
  * the tower (the engine's EVA class, vision.VisionTransformer) learns the world by attribute
    supervision: five classifiers on its mean token, and each token regresses its own 8x8 patch
    (4x4 pooled), so the 64 pooled features say what is where; light noise and blur make it read
    decoded pictures as well as rendered ones;
  * the VAE (diffusers' AutoencoderKL, 8x down) learns to reconstruct the world's pictures (L1 + MSE
    with the object's pixels weighted up, a small KL); its scaling_factor is then measured as 1 / std of the
    latents, as SDXL's was chosen;
  * the bank: tower features of every scene at several jitters, and each scene's features averaged
    over all 25 jitters (the generation target of stage 2; see wegen/toydata.py); then the VAE latents
    of the same pictures (stage 1's targets).
"""
from __future__ import annotations

import os
import random

import torch
import torch.nn.functional as F
from torch import nn

from .. import toyworld as W
from ..toydata import SCENES, jitters, render_batch, to_pixels
from ..vision import VisionTransformer, avg_pool_tokens, preprocess
from . import common
from .toymodel import EVA_TOY, VAE_TOY


class TowerProbe(nn.Module):
    """Training-only heads on the tower: attribute logits from the mean token, a 4x4 patch from each token."""

    def __init__(self, width: int, patch_values: int = 4 * 4 * 3):
        super().__init__()
        self.attributes = nn.ModuleDict({a: nn.Linear(width, len(W.CHOICES[a])) for a in W.ATTRIBUTES})
        self.patch = nn.Linear(width, patch_values)

    def forward(self, tokens):
        """(B, 64, C) -> ({attribute: (B, n)}, (B, 64, 48))."""
        mean = tokens.mean(dim=1)
        return {a: head(mean) for a, head in self.attributes.items()}, self.patch(tokens)


def new_tower(gen: torch.Generator) -> VisionTransformer:
    tower = VisionTransformer(EVA_TOY)
    with torch.no_grad():
        tower.pos_embed.normal_(0, 0.02, generator=gen)
        tower.cls_token.normal_(0, 0.02, generator=gen)
    return tower


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, H, W, 3) 0..1: half the batch gets pixel noise (sigma up to 0.05), a third a 3x3 blur."""
    B = pixels.shape[0]
    x = pixels.permute(0, 3, 1, 2)
    blur = torch.rand(B, generator=gen) < 0.3
    if blur.any():
        x = x.clone()
        x[blur] = F.avg_pool2d(x[blur], 3, stride=1, padding=1, count_include_pad=False)
    noisy = (torch.rand(B, 1, 1, 1, generator=gen) < 0.5).float()
    sigma = torch.rand(B, 1, 1, 1, generator=gen) * 0.05 * noisy
    x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def tower_features(tower: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 64, 64, 3) 0..1 -> (B, 64, C): exactly the engine's path (vision.encode_images)."""
    return avg_pool_tokens(tower(preprocess(pixels, tower.cfg.image_size)), tower.cfg.n_query)


def _attribute_targets(scenes) -> dict:
    return {a: torch.tensor([W.CHOICES[a].index(getattr(s, a)) for s in scenes]) for a in W.ATTRIBUTES}


def train_tower(out: str, steps: int, seed: int, batch: int = 128, lr: float = 1e-3, log_file=None) -> str:
    path = f"{out}/tower.pt"
    state = common.StageState(seed, "tower")
    torch.manual_seed(common.stage_seed(seed, "tower-init"))  # the Linear layers initialise with the global generator
    tower, probe = new_tower(state.gen), TowerProbe(EVA_TOY.width)
    modules = {"tower": tower, "probe": probe}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if os.path.isfile(path):
        state.load(path, modules, opt)

    def step():
        scenes = [W.random_scene(state.rng) for _ in range(batch)]
        pixels = to_pixels(render_batch(scenes))
        logits, patches = probe(tower_features(tower, augment(pixels, state.gen)))
        targets = _attribute_targets(scenes)
        ce = sum(F.cross_entropy(logits[a], targets[a]) for a in W.ATTRIBUTES)
        patch_target = F.avg_pool2d(pixels.permute(0, 3, 1, 2) * 2 - 1, 2)  # (B, 3, 32, 32): 4x4 per 8px patch
        patch_target = patch_target.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, 3, 8, 8, 4, 4)
        patch_target = patch_target.permute(0, 2, 3, 4, 5, 1).reshape(batch, 64, 48)
        mse = F.mse_loss(patches, patch_target)
        loss = ce + 4 * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"ce": ce.item(), "patch": mse.item()}

    common.run_steps(state, steps, path, modules, opt, step, base_lr=lr, warmup=50, log_file=log_file)
    return path


OBJECT_WEIGHT = 8.0  # VAE loss weight of object pixels over background pixels (+1)


def weighted_reconstruction(x, y, outline: bool = False):
    """L1 + MSE of (B, 3, H, W) pictures in -1..1, the object's pixels weighted up (the object is a few % of the
    pixels: unweighted, colour and shape are learnt last); `outline` also weights the band 2 px either side of its
    outline up."""
    obj = (x != x[:, :, :1, :1]).any(dim=1, keepdim=True).float()  # the top-left pixel is background
    weight = 1 + OBJECT_WEIGHT * obj
    if outline:
        weight = weight + 2 * OBJECT_WEIGHT * (F.max_pool2d(obj, 5, 1, 2) + F.max_pool2d(-obj, 5, 1, 2))
    err = y - x
    return ((err.abs() + err * err) * weight).mean() / weight.mean()


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_TOY)


def train_vae(out: str, steps: int, seed: int, batch: int = 32, lr: float = 1e-3, log_file=None) -> str:
    path = f"{out}/vae.pt"
    state = common.StageState(seed, "vae")
    torch.manual_seed(common.stage_seed(seed, "vae-init"))  # diffusers initialises with the global generator
    vae = new_vae()
    modules = {"vae": vae}
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    if os.path.isfile(path):
        state.load(path, modules, opt)

    def step():
        scenes = [W.random_scene(state.rng) for _ in range(batch)]
        x = to_pixels(render_batch(scenes)).permute(0, 3, 1, 2) * 2 - 1  # (B, 3, 64, 64) in -1..1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=state.gen)
        y = vae.decode(z).sample
        rec = weighted_reconstruction(x, y)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"rec": rec.item(), "kl": kl.item()}

    common.run_steps(state, steps, path, modules, opt, step, base_lr=lr, warmup=50, log_file=log_file)
    return path


def train_vae_decoder(out: str, steps: int, seed: int, batch: int = 32, lr: float = 5e-4, log_file=None) -> str:
    """Fine-tune the VAE's decoder alone, edges weighted up: the encoder (so every latent stage 1 learnt) is
    frozen, and the decoder learns to draw the object's outline as sharply as the reader needs (size is the
    bounding box, shape the fill ratio)."""
    path = f"{out}/vae_decoder.pt"
    state = common.StageState(seed, "vae_decoder")
    vae = new_vae()
    modules = {"vae": vae}
    common.load_modules(f"{out}/vae.pt", modules)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if os.path.isfile(path):
        state.load(path, modules, opt)

    def step():
        scenes = [W.random_scene(state.rng) for _ in range(batch)]
        x = to_pixels(render_batch(scenes)).permute(0, 3, 1, 2) * 2 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean  # what the UNet was trained to produce
        y = vae.decode(z).sample
        rec = weighted_reconstruction(x, y, outline=True)
        opt.zero_grad(set_to_none=True)
        rec.backward()
        opt.step()
        return {"rec": rec.item()}

    vae.encoder.eval()
    common.run_steps(state, steps, path, modules, opt, step, base_lr=lr, warmup=20, log_file=log_file)
    return path


@torch.no_grad()
def build_bank(out: str, seed: int, real_per_scene: int = 8, scenes=None) -> str:
    """bank.pt: per scene the jitter-averaged tower features; for `real_per_scene` jitters each, the features.

    `scenes`: indices into SCENES to render (default: all 972); the others keep all-zero canonical features
    and get no real rows (a quick bank for tests).
    """
    path = f"{out}/bank.pt"
    if os.path.isfile(path):
        return path
    tower = new_tower(torch.Generator())
    common.load_modules(f"{out}/tower.pt", {"tower": tower})
    tower.eval()
    rng = random.Random(common.stage_seed(seed, "bank"))
    all_j = jitters()
    canonical = torch.zeros(len(SCENES), 64, EVA_TOY.width)
    real, real_scene, real_jitter = [], [], []
    for k in (range(len(SCENES)) if scenes is None else scenes):
        scene = SCENES[k]
        feats = tower_features(tower, to_pixels(render_batch(_shifted(scene, all_j))))  # (25, 64, C)
        canonical[k] = feats.mean(0)
        chosen = rng.sample(range(len(all_j)), real_per_scene)
        real.append(feats[chosen])
        real_scene += [k] * real_per_scene
        real_jitter += [all_j[j] for j in chosen]
    real = torch.cat(real)
    _save(path, {"canonical": canonical, "real": real, "real_scene": torch.tensor(real_scene),
                 "real_jitter": torch.tensor(real_jitter), "feature_std": float(real.std())})
    return path


@torch.no_grad()
def build_latents(out: str) -> str:
    """latents.pt: VAE latents (distribution mean x scaling_factor) of the bank's real pictures; the
    scaling_factor is 1 / their std, as SDXL's 0.13025 normalises its latents."""
    path = f"{out}/latents.pt"
    if os.path.isfile(path):
        return path
    bank = torch.load(f"{out}/bank.pt", map_location="cpu")
    vae = new_vae()
    common.load_modules(f"{out}/vae.pt", {"vae": vae})
    vae.eval()
    scenes = [W.Scene(**SCENES[int(k)].attributes(), dx=int(dx), dy=int(dy))
              for k, (dx, dy) in zip(bank["real_scene"], bank["real_jitter"])]
    latents = []
    for i in range(0, len(scenes), 256):
        x = to_pixels(render_batch(scenes[i:i + 256])).permute(0, 3, 1, 2) * 2 - 1
        latents.append(vae.encode(x).latent_dist.mean)
    latents = torch.cat(latents)
    scaling = float(1.0 / latents.std())
    _save(path, {"latents": latents * scaling, "scaling_factor": scaling})
    return path


def _shifted(scene, offsets):
    return [W.Scene(**scene.attributes(), dx=dx, dy=dy) for dx, dy in offsets]


def _save(path: str, data: dict):
    torch.save(data, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)

