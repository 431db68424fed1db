"""WeGen Understand: image(s) + question -> the MLLM's text answer (no image is generated)."""
from __future__ import annotations

from ..wegen import rules
from . import convert, host


class WeGenUnderstand:
    TITLE = "WeGen Understand"
    CATEGORY = "WeGen/understanding"
    DESCRIPTION = ("Asks the WeGen multimodal LLM a question about one or more images (a batch: every image "
                   "becomes an image block before the question, in batch order) and returns its answer. The image "
                   "tokens are masked, so the model answers in text only. Show the answer with Preview as Text, "
                   "or feed it to WeGen MLLM Encode.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("reply",)
    OUTPUT_TOOLTIPS = ("The model's answer.",)
    FUNCTION = "understand"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WEGEN_MODEL", {"tooltip": "From WeGen Loader."}),
                "images": ("IMAGE", {"tooltip": "The image(s) to ask about."}),
                "question": ("STRING", {"multiline": True, "default": "Describe this image in detail.",
                                        "tooltip": "What to ask about the images."}),
                "max_new_tokens": rules.widget("max_new_tokens", "Longest answer, in tokens.", default=256),
                "temperature": rules.widget("temperature", "0 = greedy (release). > 0 samples (extension)."),
                "top_p": rules.widget("top_p"),
                "seed": rules.widget("seed", "Sampling seed; only used when temperature > 0 (extension).",
                                     control_after_generate=False),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def understand(self, model, images, question, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0,
                   unique_id=None):
        images = convert.image_in(images, "images")
        question = convert.text_in(question, "question")
        if not question.strip():
            raise ValueError("question is empty: ask something about the images")
        seed = convert.seeds(seed, 1)[0]
        engine = host.load_engine(model)
        with host.stage(model, engine, "eva", "mllm") as progress:
            reply = engine.understand(images, question, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed, callback=progress)
        host.show_text(unique_id, reply)
        return (reply,)


NODE_CLASS_MAPPINGS = {"WeGenUnderstand": WeGenUnderstand}
