"""The fast path: static KV cache + CUDA-graph decode, UNet graph replay, optional torch.compile, spreading.

Not part of the release (it decodes eagerly, one token at a time, and runs the UNet eagerly); every
piece here computes what the plain path computes and is dispatched only where it is safe:

* `fastdecode.decode_runner` (its own module): the single-token step of `mllm.decode`'s main stream on
  a static KV cache, captured as a CUDA graph per attention-length bucket, optionally with a compiled
  decoder layer. It uses the settings, graph capture and caches below.
* `unet_runner`: the UNet call of `decoder.generate`, captured as a CUDA graph per input shape
  (optionally after torch.compile) and replayed for every step. CUDA only.
* `ZeroContextSkip`: CFG's unconditional rows (an all-zero context) skip cross-attention, whose output
  for them is exactly to_out's bias. Everywhere.
* `prepare_decoder_modules`: channels-last weights for the VAE on the CPU only (measured faster there;
  on an H100 NCHW was faster for both the UNet and the VAE). The values agree with NCHW to rounding.
* `spread_module`: accelerate's device_map over several GPUs (an optional import).

Each fallback logs its reason once. `configure()` switches pieces on or off (env: WEGEN_FASTPATH=0
turns everything off, WEGEN_COMPILE=default|max-autotune compiles the UNet and the decode layer).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "max-autotune")
MAX_CACHED = 2  # static decoders / UNet graphs kept per module (least recently used dropped)


@dataclass
class FastSettings:
    enabled: bool = True  # master switch (WEGEN_FASTPATH=0 turns it off)
    cuda_graphs: bool = True  # capture/replay the decode step and the UNet call on CUDA
    static_decode: bool = True  # static KV cache for the decode loop on CUDA
    static_on_cpu: bool = False  # tests/bench only: run the static-cache step eagerly on the CPU too
    graphs_on_cpu: bool = False  # tests only: "capture" on the CPU too, through a stand-in for _capture_graph
    compile: str = "off"  # torch.compile the UNet and the decode layer: off | default | max-autotune (WEGEN_COMPILE)


def _settings_from_env() -> FastSettings:
    s = FastSettings()
    if os.environ.get("WEGEN_FASTPATH", "1").strip().lower() in ("0", "false", "off", "no"):
        s.enabled = False
    mode = os.environ.get("WEGEN_COMPILE", "off").strip().lower() or "off"
    s.compile = {"1": "default", "0": "off"}.get(mode, mode)
    if s.compile not in COMPILE_MODES:
        log.warning("WEGEN_COMPILE=%r is not one of %s; compile stays off", mode, COMPILE_MODES)
        s.compile = "off"
    return s


SETTINGS = _settings_from_env()
_LOGGED: set = set()


def configure(**changes) -> FastSettings:
    """Change SETTINGS in place (names as in FastSettings); returns the previous settings."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(FastSettings)}
    if unknown:
        raise ValueError(f"unknown fast-path settings {sorted(unknown)}; "
                         f"allowed: {[f.name for f in dataclasses.fields(FastSettings)]}")
    if "compile" in changes and changes["compile"] not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {changes['compile']!r}")
    previous = dataclasses.replace(SETTINGS)
    for k, v in changes.items():
        setattr(SETTINGS, k, v)
    return previous


@contextlib.contextmanager
def settings(**changes):
    """Temporarily change SETTINGS (tests, the bench's stock/ours comparison)."""
    previous = configure(**changes)
    try:
        yield SETTINGS
    finally:
        configure(**dataclasses.asdict(previous))


def _log_once(key: str, message: str, *args):
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(message, *args)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class _ModuleCache(dict):
    """Fast-path state of one module, kept in its __dict__: it dies with the module, is never copied or pickled."""

    def __deepcopy__(self, memo):
        return _ModuleCache()

    def __reduce__(self):
        return (_ModuleCache, ())


def _cache_of(module: torch.nn.Module) -> _ModuleCache:
    cache = module.__dict__.get("_wegen_fastpath")
    if cache is None:
        cache = module.__dict__["_wegen_fastpath"] = _ModuleCache()
    return cache


def _signature(module: torch.nn.Module) -> int:
    """Where every parameter lives: a captured graph reads these addresses, so it is valid only while they hold
    (a module moved away and back may get other addresses, or the same first one by chance)."""
    return hash(tuple((p.device.type, p.device.index, p.data_ptr()) for p in module.parameters()))


# Shared by the decode (fastdecode) and the UNet -------------------------------------------------

def _graphs_allowed(device) -> bool:
    return SETTINGS.cuda_graphs and (device.type == "cuda" or SETTINGS.graphs_on_cpu)


def _capture_graph(fn, device, warmup: int, reset=None):
    """Run `fn` `warmup` times on a side stream, call `reset`, then capture one call of `fn` as a CUDA graph.

    Capturing runs nothing; `graph.replay()` runs the recorded kernels on the tensors `fn` touched.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):  # cuBLAS/cuDNN plans, lazy inits, compiled kernels: none of it may happen in capture
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph


_COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager" (the same tracing, no code generation)


# UNet: one CUDA graph per input shape (optionally of the compiled module) -------------------------

class UNetCall:
    """fn(x, t, ctx, added) -> eps: the UNet (or its compiled wrapper) with `zero_rows` leading rows of the
    batch known to have an all-zero context (ZeroContextSkip skips them; 0: every row is computed)."""

    def __init__(self, fn, unet, zero_rows: int = 0):
        self.fn, self.zero_rows = fn, zero_rows
        self.skips = _skips(unet) if zero_rows else []

    def __call__(self, x, t, ctx, added):
        for p in self.skips:
            p.rows = self.zero_rows
        try:
            return self.fn(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        finally:
            for p in self.skips:
                p.rows = 0


class PlainDenoiser:
    """The UNet called step by step: (x, t) -> eps (x's batch already holds uncond + cond)."""

    def __init__(self, call: UNetCall, ctx, added):
        self.call, self.ctx, self.added = call, ctx, added
        self.device = ctx.device

    def __call__(self, x, t):
        return self.call(x, t.to(self.device), self.ctx, self.added)


class UNetGraph:
    """One captured UNet call: static x, t, context and added conditioning; replay writes `out`."""

    def __init__(self, call: UNetCall, x_like, t_like, ctx, added):
        self.call = call
        self.x = x_like.clone()
        self.t = torch.as_tensor(t_like, dtype=torch.float32).to(x_like.device).reshape(())
        self.ctx = ctx.clone()
        self.added = {k: v.clone() for k, v in added.items()}
        self.out = None  # allocated by the first warm-up call, outside the graph's memory pool
        self.graph = _capture_graph(self._run, x_like.device, warmup=2)

    def _run(self):
        eps = self.call(self.x, self.t, self.ctx, self.added)
        if self.out is None:
            self.out = torch.empty_like(eps)
        self.out.copy_(eps)

    def set_condition(self, ctx, added):
        self.ctx.copy_(ctx)
        for k, v in added.items():
            self.added[k].copy_(v)

    def __call__(self, x, t):
        with torch.inference_mode():  # the static tensors are inference tensors
            self.x.copy_(x)
            self.t.copy_(t)
            self.graph.replay()
            return self.out.clone()


def _unet_fn(unet):
    """The module to call: `unet`, or its torch.compile'd wrapper when SETTINGS.compile asks (cached)."""
    mode = SETTINGS.compile
    if mode == "off":
        return unet
    cache = _cache_of(unet)
    cached = cache.get("compiled")
    if cached is None or cached[0] != (mode, _COMPILE_BACKEND):
        kwargs = {"mode": "max-autotune-no-cudagraphs"} if mode == "max-autotune" else {}
        compiled = torch.compile(unet, dynamic=False, backend=_COMPILE_BACKEND, **kwargs)
        cached = cache["compiled"] = ((mode, _COMPILE_BACKEND), compiled)
        log.info("UNet compiled with torch.compile (%s); the first call per shape compiles", mode)
    return cached[1]


def unet_runner(unet, ctx: torch.Tensor, added: dict, zero_rows: int = 0):
    """Callable (x (N, 4, h, w), t) -> eps for one generate call: graph replay on CUDA, else the plain call.

    zero_rows: how many leading rows of every call have an all-zero context (decoder.generate's CFG batch).
    """
    s = SETTINGS
    if not s.enabled:
        return PlainDenoiser(UNetCall(unet, unet), ctx, added)
    fn = _unet_fn(unet)
    call = UNetCall(fn, unet, zero_rows)
    plain = PlainDenoiser(call, ctx, added)
    if not _graphs_allowed(ctx.device):
        return plain
    if any(getattr(m, "_wegen_streamed", False) for m in unet.modules()):  # weights move every call
        _log_once("unetstream", "UNet graphs skipped: its blocks stream from CPU memory (offload='sequential')")
        return plain
    if torch.is_grad_enabled():
        _log_once("unetgrad", "UNet graphs skipped: autograd is on (the engine decodes under inference_mode)")
        return plain
    return _GraphDenoiser(unet, call, ctx, added, plain)


class _GraphDenoiser:
    """Captures on the first call (the shape of x is known then); falls back to `plain` if capture fails."""

    def __init__(self, unet, call, ctx, added, plain):
        self.unet, self.call, self.ctx, self.added, self.plain = unet, call, ctx, added, plain
        self.graph = None

    def __call__(self, x, t):
        if self.graph is None:
            self.graph = _cached_unet_graph(self.unet, self.call, x, t, self.ctx, self.added) or False
        if self.graph is False:
            return self.plain(x, t)
        return self.graph(x, t)


def _cached_unet_graph(unet, call: UNetCall, x, t, ctx, added):
    per_unet = _cache_of(unet).setdefault("unet_graphs", OrderedDict())  # shapes + signature -> UNetGraph
    sig = _signature(unet)
    key = (tuple(x.shape), x.dtype, tuple(ctx.shape), tuple((k, tuple(v.shape)) for k, v in sorted(added.items())),
           id(call.fn), call.zero_rows if call.skips else 0, sig)
    for k in [k for k in per_unet if k[-1] != sig]:
        del per_unet[k]
    graph = per_unet.get(key)
    if graph is None:
        while len(per_unet) >= MAX_CACHED:
            per_unet.popitem(last=False)
        try:
            with torch.inference_mode():
                graph = UNetGraph(call, x, t, ctx, added)
        except Exception as e:  # noqa: BLE001 - out of memory, or an op that cannot be captured
            _log_once(f"unetgraph{type(e).__name__}", "CUDA graph capture of the UNet failed (%s: %s); running it "
                      "eagerly", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            return None
        per_unet[key] = graph
        _log_once("unetgraph", "UNet: CUDA graph captured for x %s", tuple(x.shape))
    else:
        per_unet.move_to_end(key)
        with torch.inference_mode():
            graph.set_condition(ctx, added)
    return graph


# UNet: classifier-free guidance against an all-zero context ---------------------------------------

class ZeroContextSkip:
    """Cross-attention processor: skips the rows whose context is all zeros (CFG's unconditional half).

    decoder.generate guides against a zero context (the release's rule) and batches [uncond, cond].
    With a zero context V = to_v(0) = 0 (no bias), so those rows' attention output is 0 whatever the
    weights, and the layer's output is exactly to_out's bias: only the other rows are computed. `rows`
    (the leading rows with a zero context) is set by UNetCall around each UNet call and is 0 (the
    wrapped processor on the whole batch) otherwise. Installed only where the shortcut is exact.
    """

    def __init__(self, inner):
        self.inner, self.rows = inner, 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        n = self.rows
        if not 0 < n < hidden_states.shape[0] or encoder_hidden_states is None or attention_mask is not None \
                or hidden_states.ndim != 3:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        cond = self.inner(attn, hidden_states[n:], encoder_hidden_states[n:], None, temb, *args, **kwargs)
        bias = attn.to_out[0].bias
        uncond = cond.new_zeros(()) if bias is None else bias.to(cond.dtype)
        return torch.cat([uncond.expand(n, *cond.shape[1:]), cond])


def zero_context_exact(attn) -> bool:
    """Whether a zero context gives exactly to_out's bias in this diffusers Attention (see ZeroContextSkip)."""
    return (getattr(attn, "is_cross_attention", False) and getattr(attn, "norm_cross", None) is None
            and getattr(attn.to_v, "bias", 0) is None and getattr(attn, "spatial_norm", 0) is None
            and getattr(attn, "add_k_proj", None) is None and not getattr(attn, "residual_connection", True)
            and getattr(attn, "rescale_output_factor", 0) == 1.0)


def install_zero_context_skip(unet) -> int:
    """Wrap the processor of every cross-attention layer where the skip is exact; returns how many."""
    n = 0
    for module in unet.modules():
        proc = getattr(module, "processor", None)
        if proc is not None and not isinstance(proc, ZeroContextSkip) and zero_context_exact(module):
            module.set_processor(ZeroContextSkip(proc))
            n += 1
    return n


def _skips(unet) -> list:
    return [m.processor for m in unet.modules() if isinstance(getattr(m, "processor", None), ZeroContextSkip)]


# Module preparation, release, spreading ----------------------------------------------------------

def prepare_decoder_modules(unet, vae, device):
    """Channels-last VAE weights on the CPU only (same values to rounding); the UNet stays NCHW, its
    cross-attention layers get ZeroContextSkip.

    Measured: tiny checkpoint, one CPU thread: VAE decode 1.24x, UNet 0.98x in channels-last. H100 at
    official dimensions (bench/results/gpu.json): the UNet's 50 graph-replayed steps took 2.28 s
    channels-last vs 2.15 s NCHW; the SDXL VAE's 1024 px decode took 142.5 ms in bf16 channels-last vs
    91.4 ms in bf16 NCHW (fp32 NCHW: 125.4 ms).
    """
    if SETTINGS.enabled and torch.device(device).type == "cpu":
        vae.to(memory_format=torch.channels_last)
    if SETTINGS.enabled:
        install_zero_context_skip(unet)


def describe(mllm_model=None, unet=None) -> dict:
    """What the fast path holds for these modules: decode ('static cache + CUDA graphs' / '(eager)' /
    'plain', plus ', compiled layer' under compile), UNet ('CUDA graph' / 'plain') with its zero-context-skip
    layer count, and the compile mode."""
    out = {"compile": SETTINGS.compile if SETTINGS.enabled else "off"}
    if mllm_model is not None:
        decs = list(_cache_of(mllm_model).get("decoders", {}).values())
        out["decode"] = ("static cache + CUDA graphs" if any(d.use_graphs and d.graphs for d in decs)
                         else "static cache (eager)" if decs else "plain")
        if any(d.layer_fn is not None for d in decs):
            out["decode"] += ", compiled layer"
    if unet is not None:
        out["unet"] = "CUDA graph" if _cache_of(unet).get("unet_graphs") else "plain"
        out["zero_context_skip"] = len(_skips(unet))  # cross-attention layers that skip CFG's uncond rows
    return out


def release(*modules):
    """Forget static caches and graphs that point at these modules' weights (call before moving them)."""
    for m in modules:
        cache = m.__dict__.get("_wegen_fastpath")
        if cache is not None:
            cache.pop("decoders", None)
            cache.pop("unet_graphs", None)


def spread_plan(module: torch.nn.Module, max_memory: dict, no_split: list[str] | None = None) -> dict:
    """accelerate's device_map for `module` under `max_memory` ({gpu index or "cpu": bytes or "20GiB"})."""
    accelerate = _import_accelerate()
    no_split = no_split or ["LlamaDecoderLayer"]
    return accelerate.infer_auto_device_map(module, max_memory=max_memory, no_split_module_classes=no_split)


def spread_module(module: torch.nn.Module, no_split: list[str] | None = None, max_memory: dict | None = None):
    """Spread `module` over every visible GPU with accelerate (balanced); returns the dispatched module."""
    accelerate = _import_accelerate()
    if not torch.cuda.is_available():
        raise ValueError("offload='spread' spreads the LLM over CUDA GPUs, but torch sees none; "
                         "use offload='none', 'idle' or 'phase'")
    no_split = no_split or ["LlamaDecoderLayer"]
    from accelerate.utils import get_balanced_memory

    max_memory = max_memory or get_balanced_memory(module, no_split_module_classes=no_split)
    device_map = spread_plan(module, max_memory, no_split)
    log.info("spread over GPUs with accelerate: %s", sorted({str(d) for d in device_map.values()}))
    return accelerate.dispatch_model(module, device_map=device_map)


def _import_accelerate():
    try:
        import accelerate
    except ImportError as e:
        raise ImportError("spreading the model over several GPUs needs accelerate: pip install accelerate") from e
    return accelerate
