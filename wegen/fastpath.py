"""The fast path: static KV cache + CUDA-graph decode, UNet graph replay, optional torch.compile, spreading.

Not part of the release (it decodes eagerly, one token at a time, and runs the UNet eagerly); every
piece here computes what the plain path computes and is dispatched only where it is safe:

* `decode_runner`: the single-token step of `mllm.decode`'s main stream, on a static KV cache (one
  preallocated (layers, B, kv_heads, L_max, head_dim) K/V buffer pair) with the step captured once per
  attention-length bucket as a CUDA graph and replayed. The prompt is still prefilled by transformers
  (DynamicCache) and copied in, so prefix reuse and `keep_prompt_cache` work unchanged. The step calls
  the model's own norms, projections and MLPs; only attention is written out (RoPE from the model's
  rotary table, SDPA over the static cache with a validity mask). CUDA only by default.
  With WEGEN_COMPILE, one decoder layer (`decoder_layer_step`) is torch.compile'd and shared by every
  layer, then captured inside the step's graph.
* `unet_runner`: the UNet call of `decoder.generate`, captured as a CUDA graph per input shape
  (optionally after torch.compile) and replayed for every step. CUDA only.
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
import torch.nn.functional as F

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "max-autotune")
KV_BUCKET = 128  # attention length of a captured decode step is rounded up to this
LMAX_BUCKET = 256  # static cache length is rounded up to this (one buffer serves many prompt lengths)
MAX_CACHED = 2  # static decoders / UNet graphs kept per module (least recently used dropped)
KV_FREE_FRACTION = 0.5  # a static cache may take at most this share of the free GPU memory


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


# Decode: static KV cache + CUDA graph of the single-token step -----------------------------------

def llm_unsupported_reason(model) -> str | None:
    """Why the static-cache step cannot stand in for transformers' forward on this model, or None."""
    llm = getattr(getattr(model, "llm", None), "model", None)
    if llm is None or not hasattr(llm, "layers") or not hasattr(llm, "rotary_emb"):
        return "the LLM is not a transformers Llama model (no .llm.model.layers / rotary_emb)"
    if getattr(model.llm, "hf_device_map", None) or any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "the LLM is dispatched by accelerate (hooks move tensors between devices)"
    rope = str(getattr(llm.rotary_emb, "rope_type", "default"))
    if "dynamic" in rope or "longrope" in rope:
        return f"rope type {rope!r} rescales with the sequence length"
    layer = llm.layers[0]
    attn = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    if attn is None or not all(hasattr(attn, n) for n in needed) or not hasattr(layer, "mlp"):
        return "the decoder layers are not Llama layers (self_attn.q/k/v/o_proj, mlp)"
    if getattr(model.llm.config, "sliding_window", None):
        return "sliding-window attention is not supported by the static cache"
    if len({p.device for p in model.parameters()}) > 1:
        return "the model's parameters are on more than one device"
    return None


def decode_runner(model, cache, mask: torch.Tensor, next_pos: torch.Tensor, max_steps: int):
    """A StaticDecoder loaded with the prefilled `cache` (B rows, L columns), or None (plain path).

    mask (B, L) 0/1 left padding; next_pos (B,) RoPE position of each row's next token; max_steps
    bounds the tokens the loop may still feed.
    """
    s = SETTINGS
    device = mask.device
    if not (s.enabled and s.static_decode) or (device.type != "cuda" and not s.static_on_cpu):
        return None
    if torch.is_grad_enabled():
        _log_once("grad", "fast decode skipped: autograd is on (the engine decodes under inference_mode)")
        return None
    reason = llm_unsupported_reason(model)
    if reason:
        _log_once(reason, "fast decode skipped: %s; using the plain transformers loop", reason)
        return None
    B, L = mask.shape
    lmax = _round_up(L + max_steps + 1, LMAX_BUCKET)
    dec = _cached_decoder(model, B, lmax, device)
    if dec is None:
        return None
    with torch.inference_mode():
        dec.load(cache, mask, next_pos)
    return dec


def _cached_decoder(model, B: int, lmax: int, device):
    per_model = _cache_of(model).setdefault("decoders", OrderedDict())  # (B, Lmax) -> StaticDecoder
    sig = _signature(model)
    for key in [k for k, d in per_model.items() if d.signature != sig]:
        del per_model[key]  # the weights moved (offload): graphs point at freed memory
    key = next((k for k in per_model if k[0] == B and k[1] >= lmax), None)
    if key is not None:
        per_model.move_to_end(key)
        return per_model[key]
    if device.type == "cuda":
        cfg = model.llm.config
        layer = model.llm.model.layers[0].self_attn
        itemsize = next(model.parameters()).element_size()
        need = 2 * len(model.llm.model.layers) * B * cfg.num_key_value_heads * lmax * layer.head_dim * itemsize
        free = torch.cuda.mem_get_info(device)[0]
        if need > KV_FREE_FRACTION * free:
            _log_once(f"kvmem{B}", "fast decode skipped for B=%d: a %d-token static cache needs %.1f GB, %.1f GB "
                      "free; using the plain loop", B, lmax, need / 1e9, free / 1e9)
            return None
    while len(per_model) >= MAX_CACHED:
        per_model.popitem(last=False)
    with torch.inference_mode():
        dec = StaticDecoder(model, B, lmax, use_graphs=_graphs_allowed(device))
    per_model[(B, lmax)] = dec
    _log_once(f"dec{device.type}", "fast decode: static KV cache%s on %s", " + CUDA graphs"
              if dec.use_graphs else " (eager)", device)
    return dec


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


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cache_layer(cache, i: int):
    """(keys, values) of layer i of a transformers DynamicCache, old (key_cache) or new (layers) API."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


class StaticDecoder:
    """Static K/V buffers for B rows and L_max columns; `step` feeds one (B, 1, H) embedding per row.

    Columns are shared by all rows (left padding); `valid` masks padding and unused columns, `pos`
    holds each row's RoPE position and `col` the next column, both advanced on the device so a
    captured graph can be replayed step after step without host synchronisation.
    """

    def __init__(self, model, B: int, lmax: int, use_graphs: bool):
        llm = model.llm.model
        cfg = model.llm.config
        p = next(model.parameters())
        self.model, self.B, self.lmax, self.use_graphs = model, B, lmax, use_graphs
        self.device, self.dtype = p.device, p.dtype
        self.signature = _signature(model)
        attn = llm.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        shape = (B, cfg.num_key_value_heads, lmax, self.head_dim)
        # one buffer per layer (not one 5-d tensor): a compiled step then writes each in place instead of
        # regenerating a view's base
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in llm.layers]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in llm.layers]
        self.valid = torch.zeros(B, lmax, dtype=torch.bool, device=self.device)
        self.col = torch.zeros(1, dtype=torch.long, device=self.device)  # next column to write
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=self.device)  # RoPE position of the next token
        self.x = torch.zeros(B, 1, cfg.hidden_size, device=self.device, dtype=self.dtype)
        self.h = torch.zeros(B, cfg.hidden_size, device=self.device, dtype=self.dtype)
        cos, sin = llm.rotary_emb(self.x, torch.arange(lmax, device=self.device)[None])  # (1, lmax, hd)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self.col_host = 0
        self.graphs: dict = {}
        self.layer_fn = compiled_layer_step()  # None: decoder_layer_step runs eagerly

    def load(self, cache, mask: torch.Tensor, next_pos: torch.Tensor):
        """Copy the prefilled DynamicCache (B, kv, L, hd per layer) in; padding columns become zeros."""
        B, L = mask.shape
        assert B == self.B and L < self.lmax, f"cache of {B}x{L} does not fit a {self.B}x{self.lmax} static cache"
        keep = mask.bool()[:, None, :, None]  # (B, 1, L, 1)
        for i, (k_buf, v_buf) in enumerate(zip(self.k, self.v)):
            k, v = _cache_layer(cache, i)
            assert k.shape[2] == L, f"layer {i} of the prefilled cache holds {k.shape[2]} columns, expected {L}"
            k_buf[:, :, :L] = torch.where(keep, k, 0)
            v_buf[:, :, :L] = torch.where(keep, v, 0)
            k_buf[:, :, L:] = 0
            v_buf[:, :, L:] = 0
        self.valid.zero_()
        self.valid[:, :L] = mask.bool()
        self.col.fill_(L)
        self.pos.copy_(next_pos.view(B, 1))
        self.col_host = L

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H) embeddings -> (B, H) last-layer post-norm hidden states (a fresh tensor)."""
        if self.col_host >= self.lmax:
            raise RuntimeError(f"static KV cache of {self.lmax} columns is full")
        kv = min(_round_up(self.col_host + 1, KV_BUCKET), self.lmax)
        with torch.inference_mode():
            self.x.copy_(x)
            graph = self._graph(kv) if self.use_graphs else None
            if graph is not None:
                graph.replay()
            else:
                self._run_step(kv)
            self.col_host += 1
            return self.h.clone()

    def _run_step(self, kv: int):
        """self._step; if the compiled layer fails, again with the eager one (a step may run twice: col and pos
        advance only at its end, so a rerun rewrites the same column with the same values)."""
        try:
            return self._step(kv)
        except Exception as e:  # noqa: BLE001 - a backend/compiler failure: the eager layer computes the same
            if self.layer_fn is None:
                raise
            _log_once("deccompile", "torch.compile of the decode step failed (%s: %s); running it eagerly",
                      type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.layer_fn = None
            return self._step(kv)

    def _graph(self, kv: int):
        if kv not in self.graphs:
            try:
                self.graphs[kv] = self._capture(kv)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager steps
                _log_once("decgraph", "CUDA graph capture of the decode step failed (%s: %s); running it eagerly",
                          type(e).__name__, e)
                self.use_graphs = False
                return None
        return self.graphs[kv]

    def _capture(self, kv: int):
        saved = (self.col.clone(), self.pos.clone(), self.valid.clone())

        def step():
            self._run_step(kv)

        def restore():  # the warm-up advanced col/pos; the K/V it wrote at col are rewritten by the real step
            self.col.copy_(saved[0])
            self.pos.copy_(saved[1])
            self.valid.copy_(saved[2])

        return _capture_graph(step, self.device, warmup=1, reset=restore)

    def _step(self, kv: int):
        """One token for every row over the first `kv` columns; reads self.x, writes self.h, advances col/pos."""
        llm = self.model.llm.model
        x = self.x
        cos = self.cos[self.pos][:, None]  # (B, 1, 1, hd)
        sin = self.sin[self.pos][:, None]
        self.valid.index_fill_(1, self.col, True)
        mask = self.valid[:, None, None, :kv]  # (B, 1, 1, kv)
        layer_fn = self.layer_fn or decoder_layer_step
        for layer, k_cache, v_cache in zip(llm.layers, self.k, self.v):
            x = layer_fn(layer, x, cos, sin, mask, k_cache, v_cache, self.col, kv, self.n_rep)
        self.h.copy_(llm.norm(x)[:, -1])
        self.col.add_(1)
        self.pos.add_(1)


def decoder_layer_step(layer, x, cos, sin, mask, k_cache, v_cache, col, kv: int, n_rep: int):
    """One Llama decoder layer for one new token per row, on a static cache; returns the layer's output.

    x (B, 1, H); cos/sin (B, 1, 1, hd) of each row's position; mask (B, 1, 1, kv) valid columns;
    k_cache/v_cache (B, kvh, L_max, hd) written at column `col` (a (1,) tensor) in place.
    """
    attn = layer.self_attn
    y = layer.input_layernorm(x)
    B, T, _ = y.shape
    q = attn.q_proj(y).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, nh, 1, hd)
    k = attn.k_proj(y).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, kvh, 1, hd)
    v = attn.v_proj(y).view(B, T, -1, attn.head_dim).transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache[:, :, col] = k  # index_put_ (gpt-fast's cache write): compiled, it stays in place
    v_cache[:, :, col] = v
    keys, values = k_cache[:, :, :kv], v_cache[:, :, :kv]  # (B, kvh, kv, hd)
    if n_rep > 1:
        keys = keys.repeat_interleave(n_rep, dim=1)
        values = values.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)  # (B, nh, 1, hd)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def compiled_layer_step():
    """decoder_layer_step through torch.compile when SETTINGS.compile asks, else None (shared by every layer).

    One decoder layer is the compiled unit: every layer has the same shapes, so one program (per kv
    bucket and batch) serves all of them and compiling takes one layer's time. Compiling fuses the
    norms, RoPE, residual adds and the SiLU gate into a few kernels; the CUDA graph of the whole step is
    still captured here (after a warm-up call), so the compiler's own cudagraphs stay off.
    """
    mode = SETTINGS.compile
    if not SETTINGS.enabled or mode == "off":
        return None
    key = (mode, _COMPILE_BACKEND)
    if key not in _COMPILED_LAYER:
        kwargs = {"mode": "max-autotune-no-cudagraphs"} if mode == "max-autotune" else {}
        _COMPILED_LAYER[key] = torch.compile(decoder_layer_step, dynamic=False, backend=_COMPILE_BACKEND, **kwargs)
        log.info("decode step: one decoder layer compiled with torch.compile (%s); the first step per bucket "
                 "compiles", mode)
    return _COMPILED_LAYER[key]


_COMPILED_LAYER: dict = {}
_COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager" (the same tracing, no code generation)


# UNet: one CUDA graph per input shape (optionally of the compiled module) -------------------------

class PlainDenoiser:
    """The UNet called as the release calls it: (x, t) -> eps (x's batch already holds uncond + cond)."""

    def __init__(self, unet, ctx, added):
        self.unet, self.ctx, self.added = unet, ctx, added
        self.device = ctx.device

    def __call__(self, x, t):
        return self.unet(x, t.to(self.device), encoder_hidden_states=self.ctx, added_cond_kwargs=self.added).sample


class UNetGraph:
    """One captured UNet call: static x, t, context and added conditioning; replay writes `out`."""

    def __init__(self, fn, x_like, t_like, ctx, added):
        self.fn = fn
        self.x = x_like.clone()
        self.t = torch.as_tensor(t_like, dtype=torch.float32).to(x_like.device).reshape(())
        self.ctx = ctx.clone()
        self.added = {k: v.clone() for k, v in added.items()}
        self.out = None  # allocated by the first warm-up call, outside the graph's memory pool
        self.graph = _capture_graph(self._run, x_like.device, warmup=2)

    def _run(self):
        eps = self.fn(self.x, self.t, encoder_hidden_states=self.ctx, added_cond_kwargs=self.added).sample
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
    if cached is None or cached[0] != mode:
        kwargs = {"mode": "max-autotune-no-cudagraphs"} if mode == "max-autotune" else {}
        cached = cache["compiled"] = (mode, torch.compile(unet, dynamic=False, backend=_COMPILE_BACKEND, **kwargs))
        log.info("UNet compiled with torch.compile (%s); the first call per shape compiles", mode)
    return cached[1]


def unet_runner(unet, ctx: torch.Tensor, added: dict):
    """Callable (x (N, 4, h, w), t) -> eps for one generate call: graph replay on CUDA, else the plain call."""
    plain = PlainDenoiser(unet, ctx, added)
    s = SETTINGS
    if not s.enabled:
        return plain
    fn = _unet_fn(unet)
    if fn is not unet:
        plain = PlainDenoiser(fn, ctx, added)
    if not _graphs_allowed(ctx.device):
        return plain
    if torch.is_grad_enabled():
        _log_once("unetgrad", "UNet graphs skipped: autograd is on (the engine decodes under inference_mode)")
        return plain
    return _GraphDenoiser(unet, fn, ctx, added, plain)


class _GraphDenoiser:
    """Captures on the first call (the shape of x is known then); falls back to `plain` if capture fails."""

    def __init__(self, unet, fn, ctx, added, plain):
        self.unet, self.fn, self.ctx, self.added, self.plain = unet, fn, ctx, added, plain
        self.graph = None

    def __call__(self, x, t):
        if self.graph is None:
            self.graph = _cached_unet_graph(self.unet, self.fn, x, t, self.ctx, self.added) or False
        if self.graph is False:
            return self.plain(x, t)
        return self.graph(x, t)


def _cached_unet_graph(unet, fn, x, t, ctx, added):
    per_unet = _cache_of(unet).setdefault("unet_graphs", OrderedDict())  # shapes + signature -> UNetGraph
    sig = _signature(unet)
    key = (tuple(x.shape), x.dtype, tuple(ctx.shape), tuple((k, tuple(v.shape)) for k, v in sorted(added.items())),
           id(fn), sig)
    for k in [k for k in per_unet if k[-1] != sig]:
        del per_unet[k]
    graph = per_unet.get(key)
    if graph is None:
        while len(per_unet) >= MAX_CACHED:
            per_unet.popitem(last=False)
        try:
            with torch.inference_mode():
                graph = UNetGraph(fn, x, t, ctx, added)
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


# Module preparation, release, spreading ----------------------------------------------------------

def prepare_decoder_modules(unet, vae, device):
    """Channels-last VAE weights on the CPU only (same values to rounding); the UNet stays NCHW.

    Measured: tiny checkpoint, one CPU thread: VAE decode 1.24x, UNet 0.98x in channels-last. H100 at
    official dimensions (bench/results/gpu.json): the UNet's 50 graph-replayed steps took 2.28 s
    channels-last vs 2.15 s NCHW; the SDXL VAE's 1024 px decode took 142.5 ms in bf16 channels-last vs
    91.4 ms in bf16 NCHW (fp32 NCHW: 125.4 ms).
    """
    if SETTINGS.enabled and torch.device(device).type == "cpu":
        vae.to(memory_format=torch.channels_last)


def describe(mllm_model=None, unet=None) -> dict:
    """What the fast path holds for these modules: decode ('static cache + CUDA graphs' / '(eager)' /
    'plain', plus ', compiled layer' under compile) and UNet ('CUDA graph' / 'plain'), and the compile mode."""
    out = {"compile": SETTINGS.compile if SETTINGS.enabled else "off"}
    if mllm_model is not None:
        decs = list(_cache_of(mllm_model).get("decoders", {}).values())
        out["decode"] = ("static cache + CUDA graphs" if any(d.use_graphs and d.graphs for d in decs)
                         else "static cache (eager)" if decs else "plain")
        if any(d.layer_fn is not None for d in decs):
            out["decode"] += ", compiled layer"
    if unet is not None:
        out["unet"] = "CUDA graph" if _cache_of(unet).get("unet_graphs") else "plain"
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
