"""Memory modes (extensions, not in the release): fp8 weight storage and streaming blocks from CPU memory.

* fp8 storage (`weight_dtype` "fp8_e4m3fn" / "fp8_e5m2", ComfyUI's convention for big models): the weights of
  every Linear and Conv2d of the LLM, EVA and UNet are kept in torch.float8_*; each layer casts its weight (and
  bias) to the activations' dtype when it runs. Norms, embeddings and the VAE keep the compute dtype, and so
  does the module holding each model's first parameter (`unet.dtype`, `next(model.parameters()).dtype` name the
  compute dtype everywhere in the engine).
* offload="sequential": the LLM's decoder layers, EVA's blocks and the UNet's resnets / transformer blocks /
  resamplers stay in (pinned, when CUDA is there) CPU memory; a forward pre-hook copies one block's weights to
  the device just before it runs and a forward hook points them back at the CPU copy after, so the device holds
  the small resident parts plus one block at a time. The fast path's static decode and graphs are skipped.
* `device_bytes`: what each mode keeps on the device, counted on modules built on the meta device.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import rules

WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
STREAMED = "_wegen_streamed"  # attribute set on a streamed block: fastpath checks it


def check_weight_dtype(name: str) -> torch.dtype | None:
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {name!r}")
    return WEIGHT_DTYPES[name]


# fp8 storage ---------------------------------------------------------------------------------------

class CastLinear(nn.Linear):
    """nn.Linear whose stored weight may have another dtype than its input: cast per call."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastConv2d(nn.Conv2d):
    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


_CAST = {nn.Linear: CastLinear, nn.Conv2d: CastConv2d}


def fp8_layers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the Linear / Conv2d layers stored in fp8: all but the one holding the first parameter."""
    first = next(root.parameters(), None)
    out = []
    for name, m in root.named_modules():
        if type(m) in _CAST and not (first is not None and m.weight is first):
            out.append((name, m))
    return out


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to fp8, saturating at its largest finite value (a plain cast of an out-of-range value gives NaN)."""
    big = torch.finfo(dtype).max
    t = t.detach()
    if t.element_size() == 1:  # already fp8 (an fp8 checkpoint converted again): through float32
        t = t.float()
    return t.clamp(-big, big).to(dtype)


def store_fp8(root: nn.Module, dtype: torch.dtype | None) -> int:
    """Keep the fp8 layers' weights in `dtype` (in place; None: nothing to do). Returns how many layers."""
    if dtype is None:
        return 0
    layers = fp8_layers(root)
    for _, m in layers:
        m.__class__ = _CAST[type(m)]
        m.weight = nn.Parameter(to_fp8(m.weight, dtype), requires_grad=False)
    return len(layers)


def fp8_state(root: nn.Module, state: dict, dtype: torch.dtype, prefix: str = "") -> dict:
    """A state dict with the fp8 layers' weights in `dtype` (for `convert --weight-dtype`); `root` may be meta."""
    names = {f"{prefix}{n}.weight" if n else f"{prefix}weight" for n, _ in fp8_layers(root)}
    return {k: (to_fp8(v, dtype) if k in names else v) for k, v in state.items()}


# Sequential offload ----------------------------------------------------------------------------------

def stream_units(name: str, module: nn.Module) -> list[nn.Module]:
    """The blocks streamed from CPU memory in offload='sequential' for engine module `name`."""
    if name == "mllm":
        return list(module.llm.model.layers)
    if name == "eva":
        return list(module.blocks)
    if name == "unet":
        units = []
        for block in (*module.down_blocks, module.mid_block, *module.up_blocks):
            units += list(getattr(block, "resnets", None) or [])
            for attn in getattr(block, "attentions", None) or []:
                units += list(attn.transformer_blocks)
            units += list(getattr(block, "downsamplers", None) or []) + list(getattr(block, "upsamplers", None) or [])
        return units
    return []


def stream(module: nn.Module, units: list[nn.Module], device) -> None:
    """Place `module` on `device` except `units`, whose weights stay in CPU memory (pinned with CUDA) and visit
    the device one unit at a time, during its forward. Idempotent per unit."""
    device = torch.device(device)
    pin = device.type == "cuda" and torch.cuda.is_available()
    inside = {id(p) for u in units for p in u.parameters()} | {id(b) for u in units for b in u.buffers()}
    for m in module.modules():  # the resident part
        for p in m._parameters.values():
            if p is not None and id(p) not in inside:
                p.data = p.data.to(device)
        for key, b in m._buffers.items():
            if b is not None and id(b) not in inside:
                m._buffers[key] = b.to(device)
    for u in units:
        if getattr(u, STREAMED, False):
            continue
        tensors = [t for t in (*u.parameters(), *u.buffers())]
        host = []
        for t in tensors:
            cpu = t.data.to("cpu")
            host.append(cpu.pin_memory() if pin else cpu)
            t.data = host[-1]
        u.register_forward_pre_hook(_to_device(tensors, host, device))
        u.register_forward_hook(_to_host(tensors, host))
        setattr(u, STREAMED, True)


def _to_device(tensors, host, device):
    def hook(module, args):
        for t, h in zip(tensors, host):
            t.data = h.to(device, non_blocking=True)
    return hook


def _to_host(tensors, host):
    def hook(module, args, output):
        for t, h in zip(tensors, host):
            t.data = h  # the weights did not change: drop the device copy, no copy back
    return hook


def is_streamed(module: nn.Module) -> bool:
    return any(getattr(m, STREAMED, False) for m in module.modules())


# Device bytes per mode, counted on the meta device ---------------------------------------------------

OFFLOAD_MODES = rules.OFFLOAD_MODES


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: nn.Module, units=()) -> tuple[int, int, int]:
    """(all weights, resident weights outside `units`, the largest unit) in bytes."""
    inside = {id(t) for u in units for t in (*u.parameters(), *u.buffers())}
    tensors = [*module.parameters(), *module.buffers()]
    total = _bytes(tensors)
    resident = _bytes(t for t in tensors if id(t) not in inside)
    largest = max((_bytes([*u.parameters(), *u.buffers()]) for u in units), default=0)
    return total, resident, largest


def device_bytes(modules: dict, mode: str) -> int:
    """Weight bytes on the device at the peak of a turn, for modules {"mllm", "unet", "vae", "eva"?} (any device,
    meta included) already in their storage dtypes. Stages: EVA (image inputs only), MLLM, UNet + VAE.

    none: everything. idle / phase: the largest stage (EVA, the MLLM, UNet + VAE run one after another).
    sequential: every resident part + the largest streamed block.
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {mode!r}")
    counts = {n: module_bytes(m, stream_units(n, m)) for n, m in modules.items() if m is not None}
    if mode == "none":
        return sum(c[0] for c in counts.values())
    if mode in ("idle", "phase"):
        stages = [("eva",), ("mllm",), ("unet", "vae")]
        return max(sum(counts[n][0] for n in s if n in counts) for s in stages)
    return sum(c[1] for c in counts.values()) + max(c[2] for c in counts.values())
