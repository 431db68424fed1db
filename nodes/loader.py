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
                   "recommended settings.")
    RETURN_TYPES = ("WEGEN_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded WeGen model, for the MLLM Encode, Consistency Decode, Understand and "
                       "Reconstruct nodes.",)
    FUNCTION = "load"

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
        }}

    def load(self, checkpoint, dtype="auto", device="gpu"):
        if dtype not in host.DTYPES:
            raise ValueError(f"dtype must be one of {list(host.DTYPES)}, got {dtype!r}")
        if device not in host.DEVICE_POLICIES:
            raise ValueError(f"device must be one of {list(host.DEVICE_POLICIES)}, got {device!r}")
        model = host.WeGenModel(host.find_checkpoint(checkpoint), dtype, device)
        host.load_engine(model)  # load now, so a broken checkpoint fails on this node
        return (model,)


NODE_CLASS_MAPPINGS = {"WeGenLoader": WeGenLoader}
