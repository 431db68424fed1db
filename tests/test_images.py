"""Image files (wegen.images.save_png / encode_image)."""
import os

import pytest
import torch

from wegen import images


def test_save_png_writes_text_chunks_and_follows_the_suffix(tmp_path):
    from PIL import Image

    image = torch.rand(1, 16, 24, 3, generator=torch.Generator().manual_seed(0))
    png = images.save_png(image, str(tmp_path / "a.png"), {"prompt": "a fox", "seed": 7})
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (24, 16) and im.text == {"prompt": "a fox", "seed": "7"}
    assert torch.equal(images.load_image(png), (image * 255 + 0.5).floor().clamp(0, 255) / 255)
    jpg = images.save_png(image, str(tmp_path / "a.jpg"))
    with Image.open(jpg) as im:
        assert im.format == "JPEG"
    assert sorted(os.listdir(tmp_path)) == ["a.jpg", "a.png"]
    for name in ("a.foo", "noext"):
        with pytest.raises(ValueError, match="is not an image format this can write; use .png"):
            images.save_png(image, str(tmp_path / name))
    assert sorted(os.listdir(tmp_path)) == ["a.jpg", "a.png"]  # nothing written


def test_encode_image_of_a_mask_is_8_bit_grey():
    import io

    from PIL import Image

    mask = torch.zeros(8, 8)
    mask[2:5, 3:6] = 1.0
    with Image.open(io.BytesIO(images.encode_image(mask))) as im:
        assert im.mode == "L" and im.getpixel((4, 3)) == 255 and im.getpixel((0, 0)) == 0
