"""ComfyUI values <-> engine arguments; the only place the nodes convert or check types.

ComfyUI layouts (shared/reference/comfyui-host-contract.md 1.4): IMAGE float32 (B, H, W, 3) in 0..1 on
the CPU; MASK float32 (B, H, W) or (H, W), 1 = masked. The engine takes and returns the same IMAGE
layout, and its edit mask means the same thing (1 = the area to change).
"""
from __future__ import annotations

from ..wegen import rules  # the widgets' bounds, defaults and checks (stdlib only)


def decode_settings(engine, steps, cfg, width, height) -> dict:
    """Decode widgets -> steps, cfg, width, height for the engine: 0 (steps, width, height) and -1 (cfg) become
    the checkpoint's recommendation (engine.recommended); other values pass unchanged (the engine checks them)."""
    rec, auto_cfg = engine.recommended, rules.CFG_RECOMMENDED
    rules.check_finite(cfg, "cfg")
    if isinstance(cfg, (int, float)) and not isinstance(cfg, bool) and cfg < 0 and cfg != auto_cfg:
        raise ValueError(f"cfg must be >= 0, or {auto_cfg:g} for the checkpoint's recommendation ({rec['cfg']}), "
                         f"got {cfg!r}")
    return {"steps": rec["steps"] if steps == 0 and not isinstance(steps, bool) else steps,
            "cfg": rec["cfg"] if cfg == auto_cfg and not isinstance(cfg, bool) else cfg,
            "width": rec["width"] if width == 0 and not isinstance(width, bool) else width,
            "height": rec["height"] if height == 0 and not isinstance(height, bool) else height}


def feature_slice(engine, value: str) -> str:
    """feature_slice widget -> the engine's value ("checkpoint" = the checkpoint's recommendation)."""
    return engine.recommended["feature_slice"] if value == rules.CHECKPOINT_DEFAULT else value


def image_in(image, name: str = "image"):
    """IMAGE -> float32 (B, H, W, 3) on the CPU (a lone (H, W, 3) image becomes B = 1)."""
    import torch

    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name} must be an IMAGE tensor (B, H, W, 3), got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] != 3:
        hint = "; drop the alpha channel first" if image.ndim == 4 and image.shape[-1] == 4 else ""
        raise ValueError(f"{name} must be an IMAGE (B, H, W, 3) with 3 RGB channels, got shape "
                         f"{tuple(image.shape)}{hint}")
    if image.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"{name} must hold floats in 0..1 (ComfyUI IMAGE), got dtype {image.dtype}")
    return rules.check_finite(image.detach().to("cpu", torch.float32).contiguous(), name)


def mask_in(mask, name: str = "mask"):
    """MASK (B, H, W) or (H, W) -> float32 (B, H, W) on the CPU."""
    import torch

    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a MASK tensor (B, H, W), got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.numel() == 0:
        raise ValueError(f"{name} must be a MASK (B, H, W) or (H, W), got shape {tuple(mask.shape)}")
    return rules.check_finite(mask.detach().to("cpu", torch.float32).contiguous(), name)


def image_out(images):
    """Engine images -> ComfyUI IMAGE: float32 (B, H, W, 3) in 0..1, contiguous, on the CPU."""
    import torch

    return images.detach().to("cpu", torch.float32).clamp(0, 1).contiguous()


def seeds(seed, n: int) -> list[int]:
    """A seed widget value -> one seed per row (row b uses seed + b, wrapping at 2**64)."""
    return rules.seed_rows(seed, n)


def text_in(text, name: str = "text") -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    return text


def cond_in(cond, feature_shape: tuple[int, int]):
    """WEGEN_COND -> its (B, 64, C) features, checked against the model that will decode them."""
    features = getattr(cond, "features", None)
    if features is None or not hasattr(features, "shape"):
        raise ValueError(f"cond must be a WEGEN_COND from a WeGen MLLM Encode node, got {type(cond).__name__}")
    if features.ndim != 3 or tuple(features.shape[1:]) != tuple(feature_shape):
        raise ValueError(f"cond holds features of shape {tuple(features.shape)} but this model decodes "
                         f"(B, {feature_shape[0]}, {feature_shape[1]}): connect a WEGEN_COND made with the "
                         f"same checkpoint")
    return rules.check_finite(features, "cond")


def batch_size(**rows) -> int:
    """Common batch of inputs that each have 1 or B rows (None = not connected); error names the inputs."""
    sizes = {name: n for name, n in rows.items() if n is not None}
    B = max(sizes.values(), default=1)
    bad = {name: n for name, n in sizes.items() if n not in (1, B)}
    if bad:
        listing = ", ".join(f"{name} has {n}" for name, n in sizes.items())
        raise ValueError(f"batch sizes don't match ({listing}): each input must have 1 row or {B}")
    return B


def repeat_rows(t, B: int):
    """(1, ...) -> (B, ...); (B, ...) unchanged."""
    return t if t.shape[0] == B else t.expand(B, *t.shape[1:]).contiguous()
