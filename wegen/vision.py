"""EVA-CLIP-E/14-plus vision tower as released, 4x4 average pool, CLIP preprocessing.

Follows the release's `src/models/tokenizer/eva_vision.py` (EVAVisionTransformer with
`postnorm=True`, `xattn=False`) and `src/models/detokenizer/resampler.py` (AvgPoolQuery).
Module names equal the keys of `EVA-CLIP/visual.pt`, so it loads with strict=True.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# CLIP mean/std (release: configs/processer/clip_l_448_transform_resize.yaml)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EvaConfig:
    image_size: int = 448  # YAML-only constant (eva_vision.yaml); PatchEmbed asserts it
    patch_size: int = 14
    width: int = 1792
    layers: int = 64
    head_width: int = 112  # YAML-only constant; heads = width // head_width = 16
    mlp_dim: int = 15360  # width * 60/7
    n_query: int = 64  # YAML-only: AvgPoolQuery(n_query=64) -> 8x8 grid
    eps: float = 1e-6  # EVA LayerNorm eps

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        B, C, H, W = x.shape
        assert (H, W) == (self.image_size, self.image_size), f"EVA input must be {self.image_size}px, got {H}x{W}"
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, N, C)


class Attention(nn.Module):
    """Plain softmax attention with one fused qkv Linear (bias on q, k and v)."""

    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.heads * cfg.head_width, bias=True)
        self.proj = nn.Linear(cfg.heads * cfg.head_width, cfg.width)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, -1))


class Mlp(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-norm block: x + LN(attn(x)), then x + LN(mlp(x)); no layer-scale, no rel-pos."""

    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg)

    def forward(self, x):
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))


class VisionTransformer(nn.Module):
    """EVA tower: patch embed + CLS + learned pos, post-norm blocks, no final norm, CLS dropped."""

    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid + 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))

    def forward(self, pixels):
        """(B, 3, 448, 448) CLIP-normalised -> (B, 1024, 1792) patch features."""
        x = self.patch_embed(pixels)  # (B, 1024, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1025, C)
        for block in self.blocks:
            x = block(x)
        return x[:, 1:]  # (B, 1024, C), CLS dropped


def avg_pool_tokens(tokens: torch.Tensor, n_query: int = 64) -> torch.Tensor:
    """AvgPoolQuery: (B, N, C) on a sqrt(N) grid -> (B, n_query, C); 1024 -> 64 is a 4x4 pool."""
    B, N, C = tokens.shape
    side, q_side = math.isqrt(N), math.isqrt(n_query)
    assert side * side == N and q_side * q_side == n_query and side % q_side == 0, \
        f"token count {N} must be a square grid divisible into {n_query} queries"
    stride = side // q_side
    grid = tokens.transpose(1, 2).reshape(B, C, side, side)  # (B, C, 32, 32)
    pooled = F.avg_pool2d(grid, stride)  # (B, C, 8, 8)
    return pooled.flatten(2).transpose(1, 2)  # (B, 64, C)


RESIZE_MODES = ("bicubic", "bilinear")


def preprocess(images: torch.Tensor, image_size: int = 448, resize: str = "bicubic") -> torch.Tensor:
    """(B, H, W, 3) float 0..1 -> (B, 3, S, S) CLIP-normalised; resize to S x S, no crop.

    resize="bilinear" is the release's transform (torchvision `Resize((448, 448))`: bilinear with antialias,
    as its tensor path computes it); "bicubic" (antialiased, clamped to 0..1) is this pack's default, an
    extension kept for the images the bundled checkpoints were trained on.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode=resize, align_corners=False, antialias=True)
        if resize == "bicubic":  # bicubic overshoots; bilinear weights are >= 0 and the release does not clamp
            x = x.clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_images(eva: VisionTransformer, images: torch.Tensor, device, dtype, resize: str = "bicubic") -> torch.Tensor:
    """(B, H, W, 3) 0..1 -> pooled EVA features (B, 64, C) in `dtype` on `device`."""
    pixels = preprocess(images, eva.cfg.image_size, resize).to(device=device, dtype=dtype)
    return avg_pool_tokens(eva(pixels), eva.cfg.n_query)
