"""Image files <-> float tensors (B, H, W, 3) in 0..1 (ComfyUI's IMAGE layout), contact sheets."""
from __future__ import annotations

import os

import numpy as np
import torch


def load_image(path: str) -> torch.Tensor:
    """An image file -> (1, H, W, 3) float32 in 0..1 (RGB; alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {os.path.abspath(path)}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {os.path.abspath(path)}: not a readable image file ({e})") from e
    return torch.from_numpy(rgb)[None]


def to_pil(image: torch.Tensor):
    """(H, W, 3) float 0..1 -> PIL RGB image."""
    from PIL import Image

    return Image.fromarray(np.clip(255.0 * image.detach().cpu().float().numpy() + 0.5, 0, 255).astype(np.uint8))


def save_png(image: torch.Tensor, path: str, text: dict | None = None) -> str:
    """(H, W, 3) or (1, H, W, 3) -> PNG file (optional text chunks); returns the path."""
    from PIL import PngImagePlugin

    if image.ndim == 4:
        image = image[0]
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, str(v))
    to_pil(image).save(path, pnginfo=info)
    return path


def check_writable(path: str, is_dir: bool = False) -> str:
    """Create the folder for `path` (or `path` itself) and check it can be written; ValueError otherwise."""
    folder = path if is_dir else (os.path.dirname(os.path.abspath(path)) or ".")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output path {path} cannot be written: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK) or (not is_dir and os.path.isdir(path)):
        raise ValueError(f"output path {path} cannot be written (folder {folder} is not writable, or the path is a folder)")
    return path
