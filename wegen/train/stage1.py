"""Stage 1: the UNet as a detokenizer of the 64 pooled tower features (release: train_detokenizer.py).

Conditioning exactly as the engine feeds it (wegen/decoder.py): the 64 features as cross-attention
context, their mean as SDXL's pooled `text_embeds`, time ids [H, W, 0, 0, H, W]; 10 % of the rows get
all-zero context and pooled (the engine's unconditional branch), so classifier-free guidance works.
Noise follows the scheduler config's betas; the target follows its prediction_type (the toy: "sample",
the clean latents; the release: "epsilon"). Half the rows are conditioned on the picture's own
features (reconstruction), half on its scene's jitter-averaged features (what stage 2 predicts).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import common
from .toymodel import IMAGE_SIZE, SCHEDULER_TOY, UNET_TOY

P_UNCOND = 0.1
P_CANONICAL = 0.5


def new_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_TOY)


def alphas_cumprod(config: dict) -> torch.Tensor:
    """(T,) cumulative alphas of the scheduler config's beta schedule (scaled_linear or linear)."""
    T = int(config["num_train_timesteps"])
    if config["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, T, dtype=torch.float64) ** 2
    elif config["beta_schedule"] == "linear":
        betas = torch.linspace(config["beta_start"], config["beta_end"], T, dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule {config['beta_schedule']!r} is not supported here")
    return torch.cumprod(1 - betas, 0).float()


def diffusion_target(config: dict, x0, noise, ac_t):
    kind = config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return ac_t.sqrt() * noise - (1 - ac_t).sqrt() * x0
    raise ValueError(f"prediction_type {kind!r} is not supported")


def train_unet(out: str, steps: int, seed: int, device: str = "cpu", batch: int = 64, lr: float = 3e-4,
               log_file=None) -> str:
    path = f"{out}/stage1.pt"
    bank = torch.load(f"{out}/bank.pt", map_location="cpu")
    bank.update(torch.load(f"{out}/latents.pt", map_location="cpu"))
    state = common.StageState(seed, "stage1")
    torch.manual_seed(common.stage_seed(seed, "stage1-init"))
    unet = new_unet().to(device)
    modules = {"unet": unet}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    if os.path.isfile(path):
        state.load(path, modules, opt)
    ac = alphas_cumprod(SCHEDULER_TOY)
    n = bank["latents"].shape[0]
    time_ids = torch.tensor([IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE], dtype=torch.float32)

    def step():
        g = state.gen
        idx = torch.randint(0, n, (batch,), generator=g)
        x0 = bank["latents"][idx]
        ctx = bank["real"][idx].clone()
        canon = torch.rand(batch, generator=g) < P_CANONICAL
        ctx[canon] = bank["canonical"][bank["real_scene"][idx[canon]]]
        ctx[torch.rand(batch, generator=g) < P_UNCOND] = 0.0
        t = torch.randint(0, len(ac), (batch,), generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        added = {"text_embeds": ctx.mean(1).to(device), "time_ids": time_ids.expand(batch, 6).to(device)}
        pred = unet(x_t.to(device), t.to(device), ctx.to(device), added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), diffusion_target(SCHEDULER_TOY, x0, noise, a).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item()}

    common.run_steps(state, steps, path, modules, opt, step, base_lr=lr, warmup=100, log_file=log_file)
    return path
