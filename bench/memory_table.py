"""What each memory mode keeps on the GPU at the release's official dimensions, counted on the meta device.

    python bench/memory_table.py            # markdown table (README "Memory modes")

Nothing is allocated: the modules are built on the meta device (bench/models.py's official configs), cast to the
compute dtype, their Linear/Conv weights stored in fp8 where asked (wegen.memory), and their bytes counted per
mode. Activations are the project's own estimates (wegen.sweep's item_bytes / prompt_bytes: the UNet and VAE at
1024 x 1024 with CFG, a 600-token KV cache), not measurements.
"""
from __future__ import annotations

import copy
import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import models  # noqa: E402
from wegen import decoder, loading, memory, mllm, sweep, vision  # noqa: E402

GB = 1e9
TURN_TOKENS = 600  # a 1-image chat turn: prompt + 66 image tokens, with room


def official_modules(dtype=torch.bfloat16, weight_dtype: str = "default", vae_dtype=torch.float32) -> dict:
    """{"mllm", "eva", "unet", "vae"} on the meta device at the official dimensions, as an engine would hold them."""
    storage = memory.check_weight_dtype(weight_dtype)
    mods = copy.deepcopy(_meta_modules())
    for name, m in mods.items():
        torch.nn.Module.to(m, vae_dtype if name == "vae" else dtype)  # nn.Module's: no diffusers fp32 warning
        if name != "vae":
            memory.store_fp8(m, storage)
    return mods


@functools.lru_cache(maxsize=1)
def _meta_modules() -> dict:
    return {"mllm": loading.build_mllm(mllm.MllmConfig(), models.LLAMA2_7B),
            "eva": loading.build_eva(vision.EvaConfig()),
            "unet": loading.build_unet(models.SDXL_UNET), "vae": loading.build_vae(models.SDXL_VAE)}


def activation_bytes(dtype_name: str, vae_dtype_name: str, side: int = 1024, cfg: float = 2.0) -> dict:
    """Estimated activation peaks: {"mllm": KV cache + logits, "decode": max(UNet step, VAE decode)}."""
    unet = models.SDXL_UNET
    info = {"dtype": dtype_name, "vae_dtype": vae_dtype_name,
            "vae_scale_factor": decoder.DecoderConfig().vae_scale_factor,
            "unet_channels": unet["block_out_channels"], "unet_heads": _heads(unet),
            "unet_attention": [t.startswith("CrossAttn") for t in unet["down_block_types"]],
            "vae_channels": models.SDXL_VAE["block_out_channels"], "llm_layers": models.LLAMA2_7B["num_hidden_layers"],
            "llm_kv_width": models.LLAMA2_7B["hidden_size"], "llm_vocab": models.LLAMA2_7B["vocab_size"]}
    return {"mllm": sweep.prompt_bytes(info, TURN_TOKENS), "decode": sweep.item_bytes(info, side, side, cfg)}


def _heads(unet: dict) -> list[int]:
    """SDXL stores head *widths* as attention_head_dim per level ([5, 10, 20] means heads of 64 channels)."""
    return [ch // 64 for ch in unet["block_out_channels"]]


def peak_bytes(mods: dict, mode: str, act: dict, with_eva: bool = False) -> tuple[int, int]:
    """(weights on the device at the peak, weights + activations at the peak) for one 1024 px turn."""
    chosen = {k: v for k, v in mods.items() if with_eva or k != "eva"}
    weights = memory.device_bytes(chosen, mode)
    if mode == "none":
        return weights, weights + max(act.values())
    counts = {n: memory.module_bytes(m, memory.stream_units(n, m)) for n, m in chosen.items()}
    if mode in ("idle", "phase"):
        llm = counts["mllm"][0] + act["mllm"]
        dec = counts["unet"][0] + counts["vae"][0] + act["decode"]
        return weights, max(llm, dec, counts["eva"][0] if "eva" in counts else 0)
    return weights, weights + max(act.values())


ROWS = (("bf16", torch.bfloat16, "default", torch.bfloat16), ("fp16 + fp32 VAE (release)", torch.float16, "default",
                                                                torch.float32),
        ("fp8_e4m3fn weights, bf16 compute", torch.bfloat16, "fp8_e4m3fn", torch.bfloat16))


def table() -> str:
    lines = ["| weights | offload | on the GPU: weights, text-to-image | + EVA (image inputs) | estimated peak "
             "(weights + activations, 1024 px, CFG) |", "|---|---|---|---|---|"]
    for label, dtype, wd, vae_dtype in ROWS:
        mods = official_modules(dtype, wd, vae_dtype)
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
        act = activation_bytes(names[dtype], names[vae_dtype])
        for mode in memory.OFFLOAD_MODES:
            w, peak = peak_bytes(mods, mode, act)
            w_eva, _ = peak_bytes(mods, mode, act, with_eva=True)
            lines.append(f"| {label} | {mode} | {w / GB:.2f} GB | {w_eva / GB:.2f} GB | {peak / GB:.2f} GB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
