"""The rules every entry point shares: seed range and wrapping, image sizes, decode and sampling bounds, the
edit-mask and consistency rules, and the sampling widgets (bounds + tooltips) the nodes are built from.

Stdlib only, so the nodes can build their INPUT_TYPES from it without loading torch; the engine, the CLI and
the nodes all check their inputs with these functions, so an input means the same thing everywhere. Every
check raises ValueError with one line naming the input, what is allowed and what was given. Checks on
tensors (masks) use only tensor methods, so torch is never imported here.
"""
from __future__ import annotations

import math

# Finite numbers only ---------------------------------------------------------------------------------
# NaN or inf in an image, mask, reference, condition or setting would flow through the UNet into a black picture
# (and, in a chat, into every later turn): every entry checks with check_finite, so the error names the input;
# chat turns also check what the model made before saving it.


def check_finite(value, name: str, hint: str = ""):
    """`value` (a number or a tensor) unchanged; ValueError naming `name` when it holds NaN or +-inf."""
    if hasattr(value, "isfinite") and hasattr(value, "is_floating_point"):  # a tensor (tensor methods only)
        if value.is_floating_point() or value.is_complex():
            bad = int((~value.isfinite()).sum())
            if bad:
                raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf) among {value.numel()}; "
                                 f"only finite numbers are allowed{hint}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}{hint}")
    return value


# Seeds ---------------------------------------------------------------------------------------------

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # torch.Generator.manual_seed's range; ComfyUI's seed widget max


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed, name: str = "seed") -> int:
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in 0..2**64-1, got {seed!r}")
    return seed


def seed_rows(seed, n: int, name: str = "seed") -> list[int]:
    """One seed for n rows -> seed, seed + 1, ..., seed + n - 1, wrapping past 2**64 - 1 to 0."""
    check_seed(seed, name)
    return [(seed + b) % (MAX_SEED + 1) for b in range(n)]


# Sizes, steps, guidance, strength, feather -----------------------------------------------------------

MAX_SIDE = 4096  # largest width/height in pixels
SIZE_MULTIPLE = 8  # the VAE's scale factor: width/height are multiples of it
MAX_STEPS = 1000
MAX_FEATHER = 256  # pixels over which a mask edge blends into the reference


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not _is_int(v) or v <= 0 or v % SIZE_MULTIPLE or v > MAX_SIDE:
            raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE} up to {MAX_SIDE}, got {v!r}")


def check_steps(steps) -> int:
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    return steps


def check_strength(strength) -> float:
    check_finite(strength, "strength")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in 0..1, got {strength!r}")
    return strength


def check_decode_args(steps: int, guidance_scale: float, strength: float) -> None:
    check_steps(steps)
    check_finite(guidance_scale, "cfg (guidance_scale)")
    if not guidance_scale >= 0:
        raise ValueError(f"cfg (guidance_scale) must be >= 0, got {guidance_scale!r}")
    check_strength(strength)


def check_feather(feather) -> int:
    if not _is_int(feather) or not 0 <= feather <= MAX_FEATHER:
        raise ValueError(f"feather must be an integer in 0..{MAX_FEATHER} pixels, got {feather!r}")
    return feather


# Text sampling -----------------------------------------------------------------------------------------

PRESETS = ("comfyui", "release")  # release: the release's numerics (README "Official behaviour and extensions")
OFFLOAD_MODES = ("none", "idle", "phase", "sequential")  # memory modes a user picks (wegen.memory; engine adds spread)
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e5m2")  # fp8: weights stored in fp8, upcast per layer (extension)
FEATURE_SLICES = ("official", "aligned")  # official = the release's slice; aligned = an extension (see mllm)
HISTORY_FEATURES = ("stored", "eva")  # chat (extension): how past generated images re-enter the prompt


def check_sampling(temperature, top_p, max_new_tokens) -> None:
    """Text sampling settings of the MLLM: temperature >= 0 (0 = greedy), top_p in (0, 1], a positive token budget."""
    check_finite(temperature, "temperature")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


# Edit masks and decoder consistency (an extension) ------------------------------------------------------

EDIT_THRESHOLD = 0.5  # mask values above this are edited (1 = change, 0 = keep the reference's pixels)


def edit_area(mask):
    """(..., H, W) float mask -> bool tensor, True where the decoder regenerates."""
    return mask > EDIT_THRESHOLD


def empty_mask_rows(mask) -> list[int]:
    """Rows of a (B, H, W) mask with nothing to edit (no value > EDIT_THRESHOLD)."""
    edit = edit_area(mask).flatten(1)
    return [b for b in range(edit.shape[0]) if not bool(edit[b].any())]


def check_consistency(reference, mask, strength: float, feather: int, width: int, height: int) -> None:
    """Refuse every reference/mask/strength combination the decoder can't honour (never ignore an input).

    reference: (B, H, W, 3) or None; mask: (B, H, W) or None (1 = edit)."""
    check_strength(strength)
    check_feather(feather)
    if reference is None:
        if mask is not None:
            raise ValueError("mask needs a reference image: outside the mask the reference's pixels are kept; "
                             "connect reference (width x height pixels)")
        if strength < 1.0:
            raise ValueError(f"strength {strength} needs a reference image (strength < 1 starts from the "
                             f"reference); connect reference or set strength to 1.0")
        return
    h, w = reference.shape[1:3]
    if (w, h) != (width, height):
        raise ValueError(f"reference is {w}x{h} but width x height is {width}x{height}; set width={w} and "
                         f"height={h}, or resize the reference")
    if mask is None:
        if strength >= 1.0:
            raise ValueError("reference without a mask needs strength < 1: at strength 1.0 the reference is fully "
                             "replaced by noise; lower strength (e.g. 0.6) or connect a mask")
        return
    mh, mw = mask.shape[1:]
    if abs(mw / mh - w / h) > 0.01:
        raise ValueError(f"mask is {mw}x{mh} but the output is {w}x{h} (another aspect ratio); use a mask of "
                         f"the output's size")
    empty = empty_mask_rows(mask)
    if empty:
        raise ValueError(f"mask row(s) {empty} are empty (no value > {EDIT_THRESHOLD}): nothing would change. "
                         f"Paint the area to regenerate (1 = change); LoadImage gives an empty 64x64 mask for "
                         f"images without alpha")
    if strength >= 1.0 and bool(edit_area(mask).all()):
        raise ValueError("mask covers every pixel and strength is 1.0, so the reference has no effect; lower "
                         "strength or mask less")


# Widgets: (ComfyUI type, options) with their bounds and default tooltip --------------------------------
# Decode-setting widgets default to the checkpoint (an extension): 0 steps, 0 width/height, cfg -1 and
# feature_slice "checkpoint" stand for the checkpoint's `recommended` entry in wegen_config.json (the release's
# 50 steps, cfg 2.0, its UNet's size and the official slice for checkpoints without one). Any other value is
# used as it is, so saved workflows (positional widgets_values) keep their explicit settings.

CHECKPOINT_DEFAULT = "checkpoint"  # the feature_slice choice that means the checkpoint's recommendation
FEATURE_SLICE_CHOICES = (*FEATURE_SLICES, CHECKPOINT_DEFAULT)
CFG_RECOMMENDED = -1.0  # the cfg widget's "checkpoint's recommendation"
MAX_CFG_WIDGET = 30.0
MAX_NEW_TOKENS_WIDGET = 4096
STEPS_TIP = "Euler steps. 0 = the checkpoint's recommendation (the release: 50; wegen-toy: 20)."
CFG_TIP = ("UNet guidance against an all-zero condition (release: 2.0 for its FID run, 7.0 for its CLIP-T run; "
           "<= 1 turns guidance off). -1 = the checkpoint's recommendation (2.0 for the release and wegen-toy).")
SIZE_TIP = (f"a multiple of {SIZE_MULTIPLE}. 0 = the checkpoint's recommendation (the release: 1024; "
            f"wegen-toy: 64).")
FEATURE_SLICE_TIP = ("Which 64 hidden states become features. official = the release; aligned = shifted by one so "
                     "each slot reads its own state (extension); checkpoint = what the checkpoint recommends "
                     "(extension: aligned for wegen-toy, official for the release's weights).")

WIDGETS = {  # name -> (type, options in ComfyUI's order, default tooltip or None: each node says it)
    "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}, None),
    "steps": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS}, STEPS_TIP),
    "cfg": ("FLOAT", {"default": CFG_RECOMMENDED, "min": CFG_RECOMMENDED, "max": MAX_CFG_WIDGET, "step": 0.1},
            CFG_TIP),
    "size": ("INT", {"default": 0, "min": 0, "max": MAX_SIDE, "step": SIZE_MULTIPLE}, None),
    "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}, None),
    "feather": ("INT", {"default": 16, "min": 0, "max": MAX_FEATHER}, None),
    "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05}, None),
    "top_p": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01},
              "Nucleus sampling when temperature > 0 (extension)."),
    "max_new_tokens": ("INT", {"default": 512, "min": 1, "max": MAX_NEW_TOKENS_WIDGET}, None),
    "var_cfg_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 20.0, "step": 0.1},
                      "The release's guidance on the image-slot hidden states; 1.0 = off (release default)."),
    "feature_slice": (list(FEATURE_SLICE_CHOICES), {"default": CHECKPOINT_DEFAULT}, FEATURE_SLICE_TIP),
}


def widget(name: str, tooltip: str | None = None, **options) -> tuple:
    """The (type, options) input spec of a shared widget: `options` override defaults in place (same key order),
    the tooltip comes last (the widget's own unless given)."""
    kind, base, default_tip = WIDGETS[name]
    tip = tooltip if tooltip is not None else default_tip
    if tip is None:
        raise ValueError(f"widget {name!r} needs a tooltip saying what it does on this node")
    unknown = set(options) - set(base)
    if unknown:
        raise ValueError(f"widget {name!r} has no options {sorted(unknown)}")
    return (list(kind) if isinstance(kind, list) else kind, {**base, **options, "tooltip": tip})


def size_widgets(width_tip: str, height_tip: str) -> dict:
    """width and height widgets (0 = the checkpoint's size)."""
    return {"width": widget("size", width_tip), "height": widget("size", height_tip)}


def decode_widgets() -> dict:
    """steps and cfg widgets, as every decoding node shows them."""
    return {"steps": widget("steps"), "cfg": widget("cfg")}
