"""The decode fast path: static KV cache + CUDA-graph step, optionally with a compiled decoder layer.

Not part of the release (it runs transformers' forward once per token). `decode_runner` hands
`mllm.decode` a StaticDecoder for its main stream: one preallocated K/V buffer per layer
((B, kv_heads, L_max, head_dim)), the single-token step captured once per attention-length bucket as
a CUDA graph and replayed. The prompt is still prefilled by transformers (DynamicCache) and copied
in, so prefix reuse and `keep_prompt_cache` work unchanged. The step calls the model's own norms,
projections and MLPs; only attention is written out (RoPE from the model's rotary table, SDPA over
the static cache with a validity mask). With WEGEN_COMPILE one decoder layer (`decoder_layer_step`)
is torch.compile'd and shared by every layer, then captured inside the step's graph. CUDA only by
default; settings, graph capture and fallbacks are shared with the UNet's in fastpath.py.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import fastpath

KV_BUCKET = 128  # attention length of a captured decode step is rounded up to this
LMAX_BUCKET = 256  # static cache length is rounded up to this (one buffer serves many prompt lengths)
KV_FREE_FRACTION = 0.5  # a static cache may take at most this share of the free GPU memory


def llm_unsupported_reason(model) -> str | None:
    """Why the static-cache step cannot stand in for transformers' forward on this model, or None."""
    llm = getattr(getattr(model, "llm", None), "model", None)
    if llm is None or not hasattr(llm, "layers") or not hasattr(llm, "rotary_emb"):
        return "the LLM is not a transformers Llama model (no .llm.model.layers / rotary_emb)"
    if any(getattr(m, "_wegen_streamed", False) for m in model.modules()):
        return "the LLM's layers stream from CPU memory (offload='sequential'; the static step skips their hooks)"
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
    s = fastpath.SETTINGS
    device = mask.device
    if not (s.enabled and s.static_decode) or (device.type != "cuda" and not s.static_on_cpu):
        return None
    if torch.is_grad_enabled():
        fastpath._log_once("grad", "fast decode skipped: autograd is on (the engine decodes under inference_mode)")
        return None
    reason = llm_unsupported_reason(model)
    if reason:
        fastpath._log_once(reason, "fast decode skipped: %s; using the plain transformers loop", reason)
        return None
    B, L = mask.shape
    lmax = fastpath._round_up(L + max_steps + 1, LMAX_BUCKET)
    dec = _cached_decoder(model, B, lmax, device)
    if dec is None:
        return None
    with torch.inference_mode():
        dec.load(cache, mask, next_pos)
    return dec


def _cached_decoder(model, B: int, lmax: int, device):
    per_model = fastpath._cache_of(model).setdefault("decoders", OrderedDict())  # (B, Lmax) -> StaticDecoder
    sig = fastpath._signature(model)
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
            fastpath._log_once(f"kvmem{B}", "fast decode skipped for B=%d: a %d-token static cache needs %.1f GB, "
                               "%.1f GB free; using the plain loop", B, lmax, need / 1e9, free / 1e9)
            return None
    while len(per_model) >= fastpath.MAX_CACHED:
        per_model.popitem(last=False)
    with torch.inference_mode():
        dec = StaticDecoder(model, B, lmax, use_graphs=fastpath._graphs_allowed(device))
    per_model[(B, lmax)] = dec
    fastpath._log_once(f"dec{device.type}", "fast decode: static KV cache%s on %s",
                       " + CUDA graphs" if dec.use_graphs else " (eager)", device)
    return dec


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
        self.signature = fastpath._signature(model)
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
        kv = min(fastpath._round_up(self.col_host + 1, KV_BUCKET), self.lmax)
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
            fastpath._log_once("deccompile", "torch.compile of the decode step failed (%s: %s); running it "
                               "eagerly", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.layer_fn = None
            return self._step(kv)

    def _graph(self, kv: int):
        if kv not in self.graphs:
            try:
                self.graphs[kv] = self._capture(kv)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager steps
                fastpath._log_once("decgraph", "CUDA graph capture of the decode step failed (%s: %s); running "
                                   "it eagerly", type(e).__name__, e)
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

        return fastpath._capture_graph(step, self.device, warmup=1, reset=restore)

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
    mode = fastpath.SETTINGS.compile
    if not fastpath.SETTINGS.enabled or mode == "off":
        return None
    key = (mode, fastpath._COMPILE_BACKEND)
    if key not in _COMPILED_LAYER:
        kwargs = {"mode": "max-autotune-no-cudagraphs"} if mode == "max-autotune" else {}
        _COMPILED_LAYER[key] = torch.compile(decoder_layer_step, dynamic=False, backend=fastpath._COMPILE_BACKEND,
                                             **kwargs)
        fastpath.log.info("decode step: one decoder layer compiled with torch.compile (%s); the first step per bucket "
                 "compiles", mode)
    return _COMPILED_LAYER[key]


_COMPILED_LAYER: dict = {}
