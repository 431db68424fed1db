"""WeGen Loader: a bundled checkpoint (wegen-toy) or a folder under models/wegen/ -> WEGEN_MODEL (a handle to a
cached engine)."""
from __future__ import annotations

from . import host

DEFAULT_CHECKPOINT = "wegen-toy"  # bundled with the pack (checkpoints/wegen-toy); the example workflows use it


class WeGenLoader:
    TITLE = "WeGen Loader"
    CATEGORY = "WeGen/loaders"
    DESCRIPTION = ("Loads a WeGen checkpoint (Llama-2 MLLM + EVA-CLIP + SDXL-style decoder): one bundled with the "
                   "pack (wegen-toy, the default: a small WeGen trained on the shapes world, 64 x 64 pictures, "
                   "nothing to install), or a folder under models/wegen/ (or a 'wegen' entry of "
                   "extra_model_paths.yaml): the release's wegen_mllm_ckpt/ layout or a `python -m wegen convert` "
                   "folder. A models/wegen/ folder named like a bundled checkpoint replaces it. The model stays "
                   "cached; ComfyUI's memory manager moves it on and off the GPU ('Unload models' frees it). Nodes "
                   "whose steps, cfg, size or feature slice are left at their defaults use this checkpoint's "
                   "recommended settings. Optional: preset 'release' (the release's fp16 + fp32 VAE, noise from a "
                   "device generator in the model dtype, a token budget counting every token, bilinear input "
                   "resize; the default 'comfyui' keeps ComfyUI's CPU noise, so a seed gives the same picture on "
                   "every GPU), offload (none / idle / phase / sequential, extensions) and weight_dtype (fp8 "
                   "storage, an extension).")
    RETURN_TYPES = ("WEGEN_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded WeGen model, for the MLLM Encode, Consistency Decode, Understand and "
                       "Reconstruct nodes.",)
    FUNCTION = "load"
    APPENDED_WIDGETS = ("preset", "offload", "weight_dtype")  # workflows saved before them lack their values

    @classmethod
    def INPUT_TYPES(cls):
        names = host.list_checkpoints()
        return {"required": {
            "checkpoint": (names, {
                **({"default": DEFAULT_CHECKPOINT} if DEFAULT_CHECKPOINT in names else {}),
                "tooltip": "The bundled checkpoints first (wegen-toy: trained on the shapes world, runs every "
                           "example workflow), then the checkpoint folders under models/wegen/ (official "
                           "wegen_mllm_ckpt/ layout, its parent, or a converted folder; a folder named like a "
                           "bundled checkpoint replaces it). `python -m wegen make-tiny models/wegen/tiny` makes a "
                           "tiny random-weight one for testing (its pictures are noise)."}),
            "dtype": (list(host.DTYPES), {
                "default": "auto",
                "tooltip": "Weights dtype. auto: bf16 on GPUs that support it (else fp16), fp32 on the CPU."}),
            "device": (list(host.DEVICE_POLICIES), {
                "default": "gpu",
                "tooltip": "gpu: stays on the GPU under ComfyUI's memory manager (evicted when other models "
                           "need room, freed by 'Unload models'). offload when idle: each part moves to the GPU "
                           "only for its stage and back to RAM after (less VRAM, slower). cpu: runs on the CPU."}),
        }, "optional": {
            "preset": (list(host.PRESETS), {
                "default": "comfyui",
                "tooltip": "comfyui: noise from a CPU generator in fp32 (a seed gives the same picture on every GPU, "
                           "ComfyUI's convention), bf16 where supported, max_new_tokens counts text only, bicubic "
                           "input resize. release: exactly the release's choices: fp16 with the VAE decoding in "
                           "fp32, noise from the GPU's generator in fp16, max_new_tokens counts every generated "
                           "token (the 66-token image block too), bilinear antialiased 448 px input resize."}),
            "offload": (list(host.OFFLOAD_MODES), {
                "default": "auto",
                "tooltip": "GPU memory (extensions). auto: as the device input says. none: everything resident. "
                           "idle: each stage's parts visit the GPU and leave after it. phase: only the running "
                           "stage's parts stay (official size: ~13.5 GB bf16, ~7 GB with fp8). sequential: LLM "
                           "layers and UNet/EVA blocks stream from pinned RAM one at a time (~1.2 GB of weights; "
                           "slowest)."}),
            "weight_dtype": (list(host.WEIGHT_DTYPES), {
                "default": "default",
                "tooltip": "default: weights in the compute dtype. fp8_e4m3fn / fp8_e5m2 (extension, ComfyUI's "
                           "convention): LLM, EVA and UNet weights stored in fp8 (half of bf16), each layer upcast "
                           "when it runs; small quality loss (e4m3fn keeps more precision)."}),
        }}

    def load(self, checkpoint, dtype="auto", device="gpu", preset="comfyui", offload="auto",
             weight_dtype="default"):
        for name, value, allowed in (("dtype", dtype, host.DTYPES), ("device", device, host.DEVICE_POLICIES),
                                     ("preset", preset, host.PRESETS), ("offload", offload, host.OFFLOAD_MODES),
                                     ("weight_dtype", weight_dtype, host.WEIGHT_DTYPES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        model = host.WeGenModel(host.find_checkpoint(checkpoint), dtype, device, preset, offload, weight_dtype)
        host.load_engine(model)  # load now, so a broken checkpoint fails on this node
        return (model,)


NODE_CLASS_MAPPINGS = {"WeGenLoader": WeGenLoader}
