"""WeGen Consistency Decode (WEGEN_COND -> IMAGE, optionally from a reference + edit mask) and
WeGen Reconstruct (IMAGE -> EVA features -> UNet -> IMAGE)."""
from __future__ import annotations

from ..wegen import rules
from . import convert, host


def _seed_input(default: int):
    return rules.widget("seed", "Noise seed (release: 42). Image b of a batch uses seed + b; same seed, same image. "
                                "Noise comes from a CPU generator (the same picture on every GPU), or from the "
                                "GPU's own generator in the model dtype under the Loader's preset 'release'.",
                        default=default)


def _size_inputs() -> dict:
    return rules.size_widgets(f"Output width in pixels, {rules.SIZE_TIP}", f"Output height in pixels, {rules.SIZE_TIP}")


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
                **rules.decode_widgets(),
                **_size_inputs(),
            },
            "optional": {
                "reference": ("IMAGE", {"tooltip": "Extension: the image to stay consistent with; must be "
                                                   "width x height. Needs strength < 1 or a mask."}),
                "mask": ("MASK", {"tooltip": "Extension: 1 = regenerate, 0 = keep the reference's pixels exactly. "
                                             "Needs a reference."}),
                "strength": rules.widget("strength", "Extension: how much of the schedule runs from the reference: "
                                                     "1.0 = from pure noise (release), 0.3 = close to the "
                                                     "reference. Below 1 needs a reference."),
                "feather": rules.widget("feather", "Extension: pixels over which the mask edge blends into the "
                                                   "reference (used only with a mask)."),
            },
        }

    def decode(self, model, cond, seed, steps, cfg, width, height, reference=None, mask=None, strength=1.0,
               feather=16):
        engine = host.load_engine(model)
        settings = convert.decode_settings(engine, steps, cfg, width, height)
        rules.check_size(settings["width"], settings["height"])
        width, height = settings["width"], settings["height"]
        features = convert.cond_in(cond, (engine.mllm_cfg.n_gen_tokens, engine.mllm_cfg.feature_dim))
        reference = None if reference is None else convert.image_in(reference, "reference")
        mask = None if mask is None else convert.mask_in(mask, "mask")
        rules.check_consistency(reference, mask, strength, feather, width, height)
        B = convert.batch_size(cond=features.shape[0], reference=None if reference is None else reference.shape[0],
                               mask=None if mask is None else mask.shape[0])
        with host.stage(model, engine, "unet", "vae") as progress:
            images = engine.decode_pixels(convert.repeat_rows(features, B), seed=convert.seeds(seed, B),
                                          **settings, reference=reference, mask=mask, strength=strength,
                                          feather=feather, callback=progress)
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
            **rules.decode_widgets(),
            **_size_inputs(),
        }}

    def reconstruct(self, model, images, seed, steps, cfg, width, height):
        engine = host.load_engine(model)
        settings = convert.decode_settings(engine, steps, cfg, width, height)
        rules.check_size(settings["width"], settings["height"])
        images = convert.image_in(images, "images")
        with host.stage(model, engine, "eva", "unet", "vae") as progress:
            out = engine.reconstruct(images, seed=convert.seeds(seed, images.shape[0]), **settings,
                                     callback=progress)
        return (convert.image_out(out),)


NODE_CLASS_MAPPINGS = {"WeGenConsistencyDecode": WeGenConsistencyDecode, "WeGenReconstruct": WeGenReconstruct}
