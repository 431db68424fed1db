"""Image files <-> float tensors (B, H, W, 3) in 0..1 (ComfyUI's IMAGE layout), contact sheets."""
from __future__ import annotations

import os

import numpy as np
import torch


class ImageError(ValueError):
    """An image file that is decoded but cannot be used; the message names it."""


def load_image(path: str) -> torch.Tensor:
    """An image file -> (1, H, W, 3) float32 in 0..1 (RGB), decoded correctly or refused with one line.

    EXIF orientation is applied; 16-bit greyscale is scaled by 65535 and 32-bit integer by its range; float
    (mode F, e.g. float TIFF) is read as 0..1 (clipped; NaN/inf refused); palette, grey, CMYK and alpha images
    go through PIL's RGB conversion, alpha dropped as the release and ComfyUI's IMAGE do. Images over
    PIL.Image.MAX_IMAGE_PIXELS are refused before decoding (decompression bombs).
    """
    from PIL import Image, ImageOps

    where = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"image {where} is a folder, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {where}")
    try:
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels")
            rgb = image_array(ImageOps.exif_transpose(im), where)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {where} is too large to decode ({str(e).split(',')[0]}; the limit is "
                         f"{Image.MAX_IMAGE_PIXELS} pixels, PIL.Image.MAX_IMAGE_PIXELS)") from None
    except ImageError:
        raise
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, EOFError ... from a broken file
        raise ValueError(f"cannot read image {where}: not a readable image file "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return torch.from_numpy(rgb)[None]


def image_array(im, where: str = "image") -> np.ndarray:
    """A PIL image -> (H, W, 3) float32 in 0..1 (see load_image for how each mode is scaled)."""
    if im.mode.startswith("I;16"):
        grey = np.asarray(im, dtype=np.float32) / 65535.0
    elif im.mode == "I":
        values = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if values.size == 0 or (values.min() >= 0 and values.max() <= 65535) else 2.0 ** 31 - 1
        grey = np.clip(values / scale, 0, 1).astype(np.float32)
    elif im.mode == "F":
        grey = np.asarray(im, dtype=np.float32)
        if not np.isfinite(grey).all():
            raise ImageError(f"image {where} holds NaN or infinite pixel values")
        grey = np.clip(grey, 0, 1)
    else:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))


def to_pil(image: torch.Tensor):
    """(H, W, 3) float 0..1 -> PIL RGB image; (H, W) -> 8-bit grey (a mask)."""
    from PIL import Image

    return Image.fromarray(np.clip(255.0 * image.detach().cpu().float().numpy() + 0.5, 0, 255).astype(np.uint8))


def encode_image(image: torch.Tensor, text: dict | None = None, fmt: str = "PNG") -> bytes:
    """(H, W, 3) / (1, H, W, 3) float 0..1 or an (H, W) mask -> file bytes, 8-bit (PNG: with text chunks)."""
    import io

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, str(v))
    buf = io.BytesIO()
    to_pil(image[0] if image.ndim == 4 else image).save(buf, format=fmt, pnginfo=info)
    return buf.getvalue()


def save_png(image: torch.Tensor, path: str, text: dict | None = None) -> str:
    """(H, W, 3) or (1, H, W, 3) -> an image file, written atomically: PNG with optional text chunks, or the
    format another suffix names (.jpg, .webp); ValueError for a suffix PIL cannot write. Returns the path."""
    from .files import write_atomic

    write_atomic(path, encode_image(image, text, image_format(path)))
    return path


def image_format(path: str) -> str:
    """The PIL format an output path's suffix names ("PNG" for .png); ValueError if PIL cannot write it."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"output path {path}: {ext or 'no extension'} is not an image format this can write; "
                         f"use .png (or .jpg, .webp)")
    return fmt


def check_image_out(path: str) -> str:
    """An image output path: a suffix PIL can write an RGB picture to, a writable folder (checked before any work)."""
    check_writable(path)
    fmt = image_format(path)
    try:
        encode_image(torch.zeros(8, 8, 3), {"check": "x"}, fmt)
    except Exception as e:  # XBM, MSP, Palm: no RGB; WMF, HDF5: no save handler
        raise ValueError(f"output path {path}: PIL cannot write an RGB picture as {fmt} ({e}); use .png "
                         f"(or .jpg, .webp)") from e
    return path


def check_writable(path: str, is_dir: bool = False) -> str:
    """Create the folder for `path` (or `path` itself) and check it can be written; ValueError otherwise."""
    from .files import probe_folder

    folder = path if is_dir else (os.path.dirname(os.path.abspath(path)) or ".")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output path {path} cannot be written: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK) or (not is_dir and os.path.isdir(path)):
        raise ValueError(f"output path {path} cannot be written (folder {folder} is not writable, or the path is "
                         f"a folder)")
    probe_folder(folder, f"output path {path}")
    return path


def contact_sheet(images: torch.Tensor, captions: list[str], columns: int, thumb: int = 256, min_cell: int = 192,
                  caption_lines: int = 4, font_size: int = 12) -> torch.Tensor:
    """(N, H, W, 3) + one caption each -> (1, H', W', 3) grid, `columns` wide, each caption under its image.

    Images are scaled to fit `thumb` px (never up), centred in cells at least `min_cell` px wide; captions
    are word-wrapped to the cell and cut to `caption_lines` lines with an ellipsis.
    """
    from PIL import Image, ImageDraw, ImageFont

    if images.ndim != 4 or images.shape[0] != len(captions) or images.shape[0] == 0:
        raise ValueError(f"contact_sheet needs N >= 1 images (N, H, W, 3) and N captions, got "
                         f"{tuple(images.shape)} and {len(captions)} captions")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    n, h, w = images.shape[:3]
    scale = min(1.0, thumb / max(h, w))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 3
    pad = 6
    cell_w = max(tw, min_cell) + 2 * pad
    cell_h = th + 2 * pad + caption_lines * line_h
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x0, y0 = (i % columns) * cell_w, (i // columns) * cell_h
        tile = to_pil(images[i])
        if (tw, th) != (w, h):
            tile = tile.resize((tw, th), Image.Resampling.LANCZOS)
        sheet.paste(tile, (x0 + (cell_w - tw) // 2, y0 + pad))
        for k, line in enumerate(_wrap(draw, captions[i], font, cell_w - 2 * pad, caption_lines)):
            draw.text((x0 + pad, y0 + 2 * pad + th + k * line_h), line, fill=(230, 230, 230), font=font)
    rgb = np.asarray(sheet, dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)[None]


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; long words are broken; the last kept line ends with an ellipsis if cut."""
    lines, line = [], ""
    for word in " ".join(str(text).split()).split(" "):
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "..."]
    return lines
