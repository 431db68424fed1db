"""WeGen Prompt Self-Rewrite (prompt -> K prompts, a STRING list) and WeGen Diversity Sweep (prompts x seeds ->
images, each image's prompt, a contact sheet). Both are extensions: the release decodes one greedy prompt at a
time (wegen/rewrite.py and wegen/sweep.py say how they work). The sweep saves its folder (PNGs, contact sheet,
sweep.json to reproduce every image) under <output>/wegen/sweeps/ and feeds js/sweep_grid.js through its `ui`.
"""
from __future__ import annotations

import os
import re

from ..wegen import rules
from . import convert, host

MAX_SEEDS = 256  # seeds per prompt (the `seeds` widget)
SWEEP_FOLDER = "wegen/sweeps/sweep"  # default save_to: <output>/wegen/sweeps/sweep_00001/, ...


class WeGenPromptSelfRewrite:
    TITLE = "WeGen Prompt Self-Rewrite"
    CATEGORY = "WeGen/prompting"
    DESCRIPTION = ("Extension (Prompt Self-Rewriting, reconstructed from the paper; not in the official release): "
                   "the WeGen MLLM rewrites a vague prompt into K detailed prompts, all sampled in one batched "
                   "decode (temperature, top-p; rewrite i uses seed + i). Duplicates and empty replies are "
                   "re-sampled; same seed, same prompts. The instruction template is editable ({prompt} marks "
                   "where your prompt goes). The output is a list: nodes after it run once per prompt, and WeGen "
                   "Diversity Sweep takes the whole list.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompts",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = ("K prompts (a list), the original first when keep_original is on.",)
    FUNCTION = "rewrite"

    @classmethod
    def INPUT_TYPES(cls):
        from ..wegen import rewrite

        return {
            "required": {
                "model": ("WEGEN_MODEL", {"tooltip": "From WeGen Loader."}),
                "prompt": ("STRING", {"multiline": True, "default": "a lighthouse",
                                      "tooltip": "The prompt to rewrite (vague is fine)."}),
                "n": ("INT", {"default": 4, "min": 1, "max": rewrite.MAX_N, "tooltip": "K: how many prompts."}),
                "seed": rules.widget("seed", "Rewrite i samples with seed + i; same seed, same prompts.", default=42),
                "temperature": rules.widget("temperature", "Sampling temperature; > 0 for K > 1 (0 = greedy: one "
                                                           "rewrite only).", default=rewrite.DEFAULT_TEMPERATURE),
                "top_p": rules.widget("top_p", "Nucleus sampling.", default=rewrite.DEFAULT_TOP_P),
                "max_new_tokens": rules.widget("max_new_tokens", "Token cap of one rewrite.",
                                               default=rewrite.DEFAULT_MAX_NEW_TOKENS),
                "max_chars": ("INT", {"default": rewrite.DEFAULT_MAX_CHARS, "min": 8, "max": 20000,
                                      "tooltip": "Character cap of one rewrite (cut on a word boundary)."}),
                "keep_original": ("BOOLEAN", {"default": False,
                                              "tooltip": "Your prompt itself is the first of the K."}),
                "template": ("STRING", {"multiline": True, "default": rewrite.DEFAULT_TEMPLATE,
                                        "tooltip": "The rewrite instruction; {prompt} (once) is replaced by your "
                                                   "prompt."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def rewrite(self, model, prompt, n, seed, temperature, top_p, max_new_tokens, max_chars, keep_original,
                template, unique_id=None):
        prompt = convert.text_in(prompt, "prompt")
        template = convert.text_in(template, "template")
        seed = convert.seeds(seed, 1)[0]
        from ..wegen import rewrite

        rewrite.check_rewrite_inputs(prompt, n, seed, temperature, top_p, max_new_tokens, max_chars, template,
                                     rewrite.DEFAULT_MAX_ROUNDS, bool(keep_original))  # before loading the model
        engine = host.load_engine(model)
        with host.stage(model, engine, "mllm") as progress:
            result = rewrite.rewrite_prompt(engine, prompt, n, seed=seed, temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens, max_chars=max_chars,
                                            keep_original=bool(keep_original), template=template,
                                            callback=progress)
        host.show_text(unique_id, "\n".join(f"{i + 1}. {p}" for i, p in enumerate(result.prompts)))
        return (result.prompts,)


class WeGenDiversitySweep:
    TITLE = "WeGen Diversity Sweep"
    CATEGORY = "WeGen/sampling"
    DESCRIPTION = ("Extension (diversity sweep; not in the official release): every prompt x every seed "
                   "(seed .. seed + seeds - 1), batched through the MLLM and the UNet (batch size bounded by "
                   "memory_budget_mb). Returns the images (prompt-major: prompt 0 with every seed, then prompt 1 "
                   "...), each image's prompt, and a captioned contact sheet (one row per prompt, one column per "
                   "seed). Saves the sweep folder under the output folder: the PNGs, contact_sheet.png and "
                   "sweep.json (every prompt, seed and setting, to make any image again exactly with `python -m "
                   "wegen sweep --replay`). Shows a diversity figure (mean pairwise distance of the 64-token "
                   "features and of the pixels). Prompts: connect WeGen Prompt Self-Rewrite, or type one per "
                   "line. The MLLM uses the checkpoint's recommended feature slice; steps, cfg and size left at "
                   "their defaults (0, -1, 0 x 0) use the checkpoint's recommendation too.")
    RETURN_TYPES = ("IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("images", "prompts", "contact_sheet")
    OUTPUT_IS_LIST = (False, True, False)
    OUTPUT_TOOLTIPS = ("All images as one batch (K x S, prompt-major).",
                       "The prompt of each image, in batch order (a list).",
                       "One captioned grid: a row per prompt, a column per seed.")
    INPUT_IS_LIST = True  # the whole prompt list arrives in one call: one batched sweep
    OUTPUT_NODE = True  # it saves the sweep folder
    FUNCTION = "sweep"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WEGEN_MODEL", {"tooltip": "From WeGen Loader."}),
                "prompts": ("STRING", {"multiline": True, "default": "a lighthouse at dawn\na lighthouse in a storm",
                                       "tooltip": "Connect the prompt list of WeGen Prompt Self-Rewrite, or type "
                                                  "one prompt per line."}),
                "seed": rules.widget("seed", "First image seed (release: 42).", default=42),
                "seeds": ("INT", {"default": 2, "min": 1, "max": MAX_SEEDS,
                                  "tooltip": "How many seeds per prompt: seed, seed + 1, ..."}),
                **rules.decode_widgets(),
                **rules.size_widgets(f"Image width, {rules.SIZE_TIP}", f"Image height, {rules.SIZE_TIP}"),
                "memory_budget_mb": ("INT", {"default": 4096, "min": 1, "max": 1 << 20,
                                             "tooltip": "Memory (MiB) one batch may take; sets the batch sizes "
                                                        "from an estimate of the UNet/VAE activations."}),
                "max_batch": ("INT", {"default": 16, "min": 1, "max": 256,
                                      "tooltip": "Largest batch whatever the budget."}),
                "save_to": ("STRING", {"default": SWEEP_FOLDER,
                                       "tooltip": "Folder prefix inside the output folder; each run gets "
                                                  "<prefix>_00001, _00002, ..."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sweep(self, model, prompts, seed, seeds, steps, cfg, width, height, memory_budget_mb, max_batch, save_to,
              unique_id=None):
        one = {name: _single(value, name) for name, value in (
            ("model", model), ("seed", seed), ("seeds", seeds), ("steps", steps), ("cfg", cfg), ("width", width),
            ("height", height), ("memory_budget_mb", memory_budget_mb), ("max_batch", max_batch),
            ("save_to", save_to), ("unique_id", unique_id or [None]))}
        texts = split_prompts(prompts)
        first = convert.seeds(one["seed"], 1)[0]
        from ..wegen import sweep as sw

        seed_list = sw.check_seeds(convert.seeds(first, _count(one["seeds"])))
        engine = host.load_engine(one["model"])  # cached since the Loader ran: its recommendation fills the 0s
        decode = convert.decode_settings(engine, one["steps"], one["cfg"], one["width"], one["height"])
        settings = sw.SweepSettings(**decode, feature_slice=engine.recommended["feature_slice"],
                                    memory_budget_mb=one["memory_budget_mb"], max_batch=one["max_batch"])
        sw.check_sweep_inputs(texts, seed_list, settings)
        folder, subfolder = sweep_folder(one["save_to"])
        with host.stage(one["model"], engine, "mllm", "unet", "vae") as progress:
            result = sw.sweep(engine, texts, seed_list, settings, out_dir=folder, callback=progress)
        host.show_text(one["unique_id"], diversity_text(result.diversity))
        shown = {"subfolder": subfolder, "type": "output", "columns": len(seed_list),
                 "images": [it["file"] for it in result.manifest["items"]], "prompts": result.prompts,
                 "seeds": result.seeds, "contact_sheet": sw.SHEET, "diversity": result.diversity}
        return {"ui": {"wegen_sweep": [shown]},
                "result": (convert.image_out(result.images), result.prompts, convert.image_out(result.contact_sheet))}


def _single(value, name: str):
    """INPUT_IS_LIST gives every input as a list; the settings must be one value each."""
    values = value if isinstance(value, list) else [value]
    if len(values) != 1:
        raise ValueError(f"{name} must be a single value, got a list of {len(values)}; only prompts may be a list")
    return values[0]


def _count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SEEDS:
        raise ValueError(f"seeds (how many seeds per prompt) must be an integer in 1..{MAX_SEEDS}, got {n!r}")
    return n


def split_prompts(prompts) -> list[str]:
    """A STRING list (linked) or one multiline string (typed) -> prompts, one per non-empty line."""
    values = prompts if isinstance(prompts, list) else [prompts]
    texts = []
    for value in values:
        texts += [line.strip() for line in convert.text_in(value, "prompts").splitlines() if line.strip()]
    if not texts:
        raise ValueError("prompts is empty: connect WeGen Prompt Self-Rewrite or type one prompt per line")
    return texts


def sweep_folder(save_to: str) -> tuple[str, str]:
    """save_to prefix -> (absolute new folder <output>/<prefix>_NNNNN, its subfolder relative to the output)."""
    prefix = os.path.normpath(convert.text_in(save_to, "save_to").strip() or SWEEP_FOLDER)
    if os.path.isabs(prefix) or prefix.startswith("..") or not re.fullmatch(r"[\w./ -]+", prefix):
        raise ValueError(f"save_to must be a folder prefix inside the output folder (letters, digits, _ - . /), "
                         f"got {save_to!r}")
    root = host.output_directory()
    parent, stem = os.path.split(prefix)
    os.makedirs(os.path.join(root, parent), exist_ok=True)
    taken = {name for name in os.listdir(os.path.join(root, parent)) if name.startswith(f"{stem}_")}
    n = 1
    while f"{stem}_{n:05d}" in taken:
        n += 1
    subfolder = os.path.join(parent, f"{stem}_{n:05d}").replace(os.sep, "/")
    return os.path.join(root, subfolder), subfolder


def diversity_text(d: dict) -> str:
    return (f"diversity of {d['n_images']} images from {d['n_prompts']} prompts: features cosine "
            f"{d['features_cosine']:.4f}, features rms {d['features_rms']:.4f}, pixels rms {d['pixels_rms']:.4f}")


NODE_CLASS_MAPPINGS = {"WeGenPromptSelfRewrite": WeGenPromptSelfRewrite, "WeGenDiversitySweep": WeGenDiversitySweep}
