"""WeGen MLLM Encode: prompt (+ reference images) -> WEGEN_COND (the 64 image features + reply text)."""
from __future__ import annotations

from ..wegen import rules
from . import convert, host


class WeGenMLLMEncode:
    TITLE = "WeGen MLLM Encode"
    CATEGORY = "WeGen/conditioning"
    DESCRIPTION = ("Runs the WeGen multimodal LLM on a prompt and optional reference images (each becomes an image "
                   "block in the prompt, in batch order) and returns the 64 image features the model writes, plus "
                   "its reply text. Connect the cond to WeGen Consistency Decode. Release defaults: greedy "
                   "decoding (temperature 0), var-cfg 1 (off), the official feature slice. Extensions: sampling "
                   "(temperature/top_p/seed), feature_slice 'aligned', or 'checkpoint' (the default: the "
                   "checkpoint's recommendation, official for the release's weights), force_image.")
    RETURN_TYPES = ("WEGEN_COND", "STRING")
    RETURN_NAMES = ("cond", "reply")
    OUTPUT_TOOLTIPS = ("The 64 image features (+ prompt and reply) for WeGen Consistency Decode.",
                       "The model's reply text, without the image block (empty when force_image starts the image "
                       "right away).")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WEGEN_MODEL", {"tooltip": "From WeGen Loader."}),
                "text": ("STRING", {"multiline": True, "default": "a red fox in a snowy forest, watercolor",
                                    "tooltip": "The instruction. May be empty when images are connected."}),
                "seed": rules.widget("seed", "Text sampling seed; only used when temperature > 0 (extension).",
                                     control_after_generate=False),
                "temperature": rules.widget("temperature", "0 = greedy, as the release. > 0 samples the text "
                                                           "(extension)."),
                "top_p": rules.widget("top_p"),
                "max_new_tokens": rules.widget("max_new_tokens", "Token budget (release: 512). Counts text tokens "
                                                                 "only (default preset), or every generated token, "
                                                                 "the 66-token image block included, under the "
                                                                 "Loader's preset 'release' (as the release counts)."),
                "var_cfg_scale": rules.widget("var_cfg_scale"),
                "feature_slice": rules.widget("feature_slice"),
                "force_image": ("BOOLEAN", {"default": True,
                                            "tooltip": "Start the image block right after the prompt so every "
                                                       "run yields an image (extension). Off = the release: the "
                                                       "model decides (and may answer with text only)."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Reference images, shared by the prompt (each one is an image "
                                                "block before the instruction)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def encode(self, model, text, seed=0, temperature=0.0, top_p=1.0, max_new_tokens=512, var_cfg_scale=1.0,
               feature_slice=rules.CHECKPOINT_DEFAULT, force_image=True, images=None, unique_id=None):
        text = convert.text_in(text, "text")
        refs = None if images is None else convert.image_in(images, "images")
        if not text.strip() and refs is None:
            raise ValueError("text is empty and no images are connected: give a prompt, images, or both")
        seed = convert.seeds(seed, 1)[0]
        engine = host.load_engine(model)
        feature_slice = convert.feature_slice(engine, feature_slice)
        with host.stage(model, engine, "mllm", *(("eva",) if refs is not None else ())) as progress:
            cond = engine.encode(text, refs, seed=seed, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, var_cfg_scale=var_cfg_scale,
                                 feature_slice=feature_slice, force_image=bool(force_image),
                                 callback=progress)
        host.show_text(unique_id, cond.texts[0])
        return (cond, cond.texts[0])


NODE_CLASS_MAPPINGS = {"WeGenMLLMEncode": WeGenMLLMEncode}
