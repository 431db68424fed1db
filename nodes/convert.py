"""ComfyUI values <-> engine arguments; the only place the nodes convert or check types.

ComfyUI layouts (shared/reference/comfyui-host-contract.md 1.4): IMAGE float32 (B, H, W, 3) in 0..1 on
the CPU; MASK float32 (B, H, W) or (H, W), 1 = masked. The engine takes and returns the same IMAGE
layout, and its edit mask means the same thing (1 = the area to change).
"""
from __future__ import annotations

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widget range
# Decode-setting widgets. Their defaults leave the value to the checkpoint (an extension): 0 steps, 0 width/height,
# cfg -1 and feature_slice "checkpoint" stand for the checkpoint's `recommended` entry in wegen_config.json (the
# release's 50 steps, cfg 2.0, its UNet's size and the official slice for checkpoints without one). Any other value
# is used as it is, so saved workflows (positional widgets_values) keep their explicit settings.
SIZE = {"default": 0, "min": 0, "max": 4096, "step": 8}  # width/height widgets (wegen.decoder.MAX_SIDE)
STEPS = {"default": 0, "min": 0, "max": 1000}
CFG = {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1}
CHECKPOINT_DEFAULT = "checkpoint"  # the feature_slice choice that means the checkpoint's recommendation
FEATURE_SLICES = ("official", "aligned", CHECKPOINT_DEFAULT)
STEPS_TIP = "Euler steps. 0 = the checkpoint's recommendation (the release: 50; wegen-toy: 20)."
CFG_TIP = ("UNet guidance against an all-zero condition (release: 2.0 for its FID run, 7.0 for its CLIP-T run; "
           "<= 1 turns guidance off). -1 = the checkpoint's recommendation (2.0 for the release and wegen-toy).")
SIZE_TIP = "a multiple of 8. 0 = the checkpoint's recommendation (the release: 1024; wegen-toy: 64)."


def decode_settings(engine, steps, cfg, width, height) -> dict:
    """Decode widgets -> steps, cfg, width, height for the engine: 0 (steps, width, height) and -1 (cfg) become
    the checkpoint's recommendation (engine.recommended); other values pass unchanged (the engine checks them)."""
    rec = engine.recommended
    _finite(cfg, "cfg")
    if isinstance(cfg, (int, float)) and not isinstance(cfg, bool) and cfg < 0 and cfg != -1:
        raise ValueError(f"cfg must be >= 0, or -1 for the checkpoint's recommendation ({rec['cfg']}), got {cfg!r}")
    return {"steps": rec["steps"] if steps == 0 and not isinstance(steps, bool) else steps,
            "cfg": rec["cfg"] if cfg == -1 and not isinstance(cfg, bool) else cfg,
            "width": rec["width"] if width == 0 and not isinstance(width, bool) else width,
            "height": rec["height"] if height == 0 and not isinstance(height, bool) else height}


def feature_slice(engine, value: str) -> str:
    """feature_slice widget -> the engine's value ("checkpoint" = the checkpoint's recommendation)."""
    return engine.recommended["feature_slice"] if value == CHECKPOINT_DEFAULT else value


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
    return _finite(image.detach().to("cpu", torch.float32).contiguous(), name)


def mask_in(mask, name: str = "mask"):
    """MASK (B, H, W) or (H, W) -> float32 (B, H, W) on the CPU."""
    import torch

    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a MASK tensor (B, H, W), got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.numel() == 0:
        raise ValueError(f"{name} must be a MASK (B, H, W) or (H, W), got shape {tuple(mask.shape)}")
    return _finite(mask.detach().to("cpu", torch.float32).contiguous(), name)


def _finite(value, name: str):
    """wegen.finite.check_finite: NaN/inf refused with a message naming the input."""
    from . import host

    return host.wegen("finite").check_finite(value, name)


def image_out(images):
    """Engine images -> ComfyUI IMAGE: float32 (B, H, W, 3) in 0..1, contiguous, on the CPU."""
    import torch

    return images.detach().to("cpu", torch.float32).clamp(0, 1).contiguous()


def seeds(seed, n: int) -> list[int]:
    """A seed widget value -> one seed per row (row b uses seed + b, wrapping at 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    return [(seed + b) % (MAX_SEED + 1) for b in range(n)]


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
    return _finite(features, "cond")


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
