"""WeGen Consistency Decode (WEGEN_COND -> IMAGE, optionally from a reference + edit mask) and
WeGen Reconstruct (IMAGE -> EVA features -> UNet -> IMAGE)."""
from __future__ import annotations

from . import convert, host

EDIT_THRESHOLD = 0.5  # mask values above this are edited (the engine's rule)


def _seed_input(default: int):
    return ("INT", {"default": default, "min": 0, "max": convert.MAX_SEED, "control_after_generate": True,
                    "tooltip": "Noise seed (release: 42). Image b of a batch uses seed + b; same seed, same image. "
                               "Noise comes from a CPU generator (the same picture on every GPU), or from the GPU's "
                               "own generator in the model dtype under the Loader's preset 'release'."})


def _size_inputs() -> dict:
    return {"width": ("INT", {**convert.SIZE, "tooltip": f"Output width in pixels, {convert.SIZE_TIP}"}),
            "height": ("INT", {**convert.SIZE, "tooltip": f"Output height in pixels, {convert.SIZE_TIP}"})}


def _sampling_inputs() -> dict:
    return {"steps": ("INT", {**convert.STEPS, "tooltip": convert.STEPS_TIP}),
            "cfg": ("FLOAT", {**convert.CFG, "tooltip": convert.CFG_TIP})}


def check_consistency(reference, mask, strength: float, feather: int, width: int, height: int) -> None:
    """Refuse every reference/mask/strength combination the decoder can't honour (never ignore an input)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in 0..1, got {strength!r}")
    if isinstance(feather, bool) or not isinstance(feather, int) or not 0 <= feather <= 256:
        raise ValueError(f"feather must be an integer in 0..256 pixels, got {feather!r}")
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
    edit = (mask > EDIT_THRESHOLD).flatten(1)  # (B, H*W)
    empty = [b for b in range(edit.shape[0]) if not edit[b].any()]
    if empty:
        raise ValueError(f"mask row(s) {empty} are empty (no value > {EDIT_THRESHOLD}): nothing would change. "
                         f"Paint the area to regenerate (1 = change); LoadImage gives an empty 64x64 mask for "
                         f"images without alpha")
    if strength >= 1.0 and bool(edit.all()):
        raise ValueError("mask covers every pixel and strength is 1.0, so the reference has no effect; lower "
                         "strength or mask less")


class WeGenConsistencyDecode:
    TITLE = "WeGen Consistency Decode"
    CATEGORY = "WeGen/sampling"
    DESCRIPTION = ("Turns a WEGEN_COND into images with the SDXL-style UNet (Euler, classifier-free guidance "
                   "against a zero condition) and the VAE, as the release's detokenizer. Extensions "
                   "(consistency-aware decoding): a reference image starts the latents from the reference at "
                   "'strength' (< 1); a mask (1 = change) keeps everything outside it exactly as in the "
                   "reference, blending over 'feather' pixels. Combinations that would ignore an input are "
                   "refused with a message. Steps, cfg and size left at their defaults (0, -1, 0 x 0) use the "
                   "checkpoint's recommendation (extension; e.g. 20 steps, cfg 2.0, 64 x 64 for wegen-toy, the "
                   "release's 50 steps, cfg 2.0, 1024 x 1024 for its weights).")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Decoded images, float (B, H, W, 3) in 0..1.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WEGEN_MODEL", {"tooltip": "From WeGen Loader (the same checkpoint as the cond)."}),
                "cond": ("WEGEN_COND", {"tooltip": "From WeGen MLLM Encode. A cond of 1 row is repeated for a "
                                                   "batch of references or masks."}),
                "seed": _seed_input(42),
                **_sampling_inputs(),
                **_size_inputs(),
            },
            "optional": {
                "reference": ("IMAGE", {"tooltip": "Extension: the image to stay consistent with; must be "
                                                   "width x height. Needs strength < 1 or a mask."}),
                "mask": ("MASK", {"tooltip": "Extension: 1 = regenerate, 0 = keep the reference's pixels exactly. "
                                             "Needs a reference."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "Extension: how much of the schedule runs from the reference: "
                                                  "1.0 = from pure noise (release), 0.3 = close to the reference. "
                                                  "Below 1 needs a reference."}),
                "feather": ("INT", {"default": 16, "min": 0, "max": 256,
                                    "tooltip": "Extension: pixels over which the mask edge blends into the "
                                               "reference (used only with a mask)."}),
            },
        }

    def decode(self, model, cond, seed, steps, cfg, width, height, reference=None, mask=None, strength=1.0,
               feather=16):
        engine = host.load_engine(model)
        settings = convert.decode_settings(engine, steps, cfg, width, height)
        host.wegen("decoder").check_size(settings["width"], settings["height"])
        width, height = settings["width"], settings["height"]
        features = convert.cond_in(cond, (engine.mllm_cfg.n_gen_tokens, engine.mllm_cfg.feature_dim))
        reference = None if reference is None else convert.image_in(reference, "reference")
        mask = None if mask is None else convert.mask_in(mask, "mask")
        check_consistency(reference, mask, strength, feather, width, height)
        B = convert.batch_size(cond=features.shape[0], reference=None if reference is None else reference.shape[0],
                               mask=None if mask is None else mask.shape[0])
        with host.stage(model, engine, "unet", "vae") as progress:
            images = engine.decode(convert.repeat_rows(features, B), seed=convert.seeds(seed, B), **settings,
                                   reference=reference, mask=mask, strength=strength, feather=feather,
                                   callback=progress)
        return (convert.image_out(images),)


class WeGenReconstruct:
    TITLE = "WeGen Reconstruct"
    CATEGORY = "WeGen/sampling"
    DESCRIPTION = ("Image -> EVA-CLIP features (4x4 pooled to 64 tokens) -> UNet + VAE -> image: the release's "
                   "detokenizer sanity path, showing what the 64 features keep of a picture. Batches give one "
                   "reconstruction per image. Steps, cfg and size left at their defaults (0, -1, 0 x 0) use the "
                   "checkpoint's recommendation (extension).")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Reconstructed images, float (B, H, W, 3) in 0..1.",)
    FUNCTION = "reconstruct"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WEGEN_MODEL", {"tooltip": "From WeGen Loader."}),
            "images": ("IMAGE", {"tooltip": "Images to reconstruct (any size; EVA resizes them)."}),
            "seed": _seed_input(42),
            **_sampling_inputs(),
            **_size_inputs(),
        }}

    def reconstruct(self, model, images, seed, steps, cfg, width, height):
        engine = host.load_engine(model)
        settings = convert.decode_settings(engine, steps, cfg, width, height)
        host.wegen("decoder").check_size(settings["width"], settings["height"])
        images = convert.image_in(images, "images")
        with host.stage(model, engine, "eva", "unet", "vae") as progress:
            out = engine.reconstruct(images, seed=convert.seeds(seed, images.shape[0]), **settings,
                                     callback=progress)
        return (convert.image_out(out),)


NODE_CLASS_MAPPINGS = {"WeGenConsistencyDecode": WeGenConsistencyDecode, "WeGenReconstruct": WeGenReconstruct}
