"""Llama + image projections, and the explicit VAR decode loop.

Follows the release's `src/models/mllm/wegen_mllm_var.py` (ContinuousLVLMJointLLMSDVAR.generate),
`llama2_var.py` (the VAR greedy search and the var-cfg processor) and `generation.py`
(AutoImageTokenGenerationProcessor). transformers' own `LlamaForCausalLM` runs every forward; the
loop below replaces the release's `greedy_search` override (dead on transformers >= 4.41).

The loop, per row of the batch:
  text mode   logits -> image ids scored 0.0 -> argmax (or sample) -> token embedding
  <img> seen  force <img_00000> .. <img_{n-1}>, then </img> (the release forces with max+10)
  slot k      input embedding = in_proj(out_proj(h)), h = last-layer post-norm hidden state one
              position earlier, optionally mixed with an <img>-only unconditional stream (var-cfg)
Features: out_proj of the hidden states at the 64 slot positions (feature_slice="official"), or at
<img>..<img_{n-2}>, the states whose projections were fed back (feature_slice="aligned", an
extension: the release's slice is likely one position late, see the architecture reference 3.1).
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .prompting import ImageTokenIds
from .rules import FEATURE_SLICES, check_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MllmConfig:
    hidden: int = 4096  # Llama-2-7b hidden size
    feature_dim: int = 1792  # EVA-E width: the image-feature space
    n_query: int = 64  # YAML-only: image input tokens (AvgPoolQuery n_query)
    n_gen_tokens: int = 64  # YAML-only: image generation tokens


class Projector(nn.Module):
    """One bias-free Linear under `.proj` (release: AvgPoolProjector / LinearProjector)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


class WeGenMLLM(nn.Module):
    """`llm` (transformers LlamaForCausalLM), `input_resampler` 1792->4096, `output_resampler` 4096->1792.

    Attribute names equal the release agent's state-dict prefixes (llm.*, input_resampler.proj,
    output_resampler.proj). The input pooling is parameter-free: features arrive already pooled to 64.
    """

    def __init__(self, cfg: MllmConfig, llm: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.input_resampler = Projector(cfg.feature_dim, cfg.hidden)
        self.output_resampler = Projector(cfg.hidden, cfg.feature_dim)

    def embed_tokens(self, ids):
        return self.llm.model.embed_tokens(ids)

    def feedback_embedding(self, h):
        """VAR feed-back: (..., H) hidden -> in_proj(out_proj(h)) (..., H)."""
        return self.input_resampler(self.output_resampler(h))

    def forward_hidden(self, embeds, attention_mask, position_ids, cache=None):
        """(B, T, H) embeddings -> (B, T, H) last-layer post-norm hidden states (cache updated in place)."""
        out = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=cache is not None, **cache_kwargs(self.llm.model, cache))
        return out.last_hidden_state

    def logits(self, h):
        return self.llm.lm_head(h).float()


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The cache keyword of LlamaModel.forward: `cache` on transformers >= 5.2x, `past_key_values` before."""
    name = _CACHE_ARG.get(type(model))
    if name is None:
        params = inspect.signature(type(model).forward).parameters
        name = _CACHE_ARG[type(model)] = "cache" if "cache" in params else "past_key_values"
    return {name: cache} if cache is not None else {}


_CACHE_ARG: dict = {}


def new_cache(llm: nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=llm.config)
    except TypeError:  # transformers < 4.56 takes no config
        return DynamicCache()


# Logits rules and sampling: pure functions ------------------------------------------------------

def forced_next(prev_id: int, ids: ImageTokenIds) -> int | None:
    """Token the image-block rule forces after `prev_id`, or None in text mode."""
    if prev_id == ids.start:
        return ids.slots[0]
    if prev_id in ids.slots:
        k = ids.slots.index(prev_id)
        return ids.slots[k + 1] if k + 1 < ids.n else ids.end
    return None


def mask_image_ids(logits: torch.Tensor, ids: ImageTokenIds, allow_image: bool) -> torch.Tensor:
    """Release rule in text mode: slot ids and </img> scored 0.0 (not -inf).

    allow_image=False (understanding, rewriting; an extension) bans the whole image block instead: a
    sampled slot id would otherwise force the rest of a 66-token block into a text answer.
    """
    logits = logits.clone()
    block = [*ids.slots, ids.end]
    if allow_image:
        logits[..., block] = 0.0
    else:
        logits[..., block + [ids.start]] = float("-inf")
    return logits


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p; others -> -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None, temperature: float,
                      top_p: float) -> int:
    """(V,) logits -> token id. temperature 0 is argmax and ignores the generator."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = top_p_filter(logits.float().cpu() / temperature, top_p)
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


# The decode loop ---------------------------------------------------------------------------------

@dataclass
class DecodeSettings:
    max_new_tokens: int = 512  # release: 512
    count_all_tokens: bool = False  # release: True (every generated token counts); default: text tokens only
    temperature: float = 0.0  # release: greedy
    top_p: float = 1.0
    var_cfg_scale: float = 1.0  # release: 1.0 (off)
    feature_slice: str = "official"
    allow_image: bool = True
    stop_after_image: bool = True  # features are causal: tokens after </img> cannot change them
    use_cache: bool = True  # False recomputes the whole sequence every step (reference path)


@dataclass
class RowResult:
    ids: list[int] = field(default_factory=list)  # generated ids, image block included
    features: torch.Tensor | None = None  # (n_gen, feature_dim) of the first generated image
    prompt_cache: object = None  # KV cache of the whole prompt (keep_prompt_cache=True, B=1)


@dataclass
class Prefix:
    """KV cache of (at least) the first `length` prompt tokens of a B=1 decode; longer caches are cropped."""

    cache: object
    length: int


@dataclass
class _Row:
    prev: int  # last token of the sequence so far
    n_text: int = 0
    done: bool = False
    hidden: list = field(default_factory=list)  # hidden states at <img>, <img_0>, ... (conditional)
    uncond_cache: object = None  # var-cfg stream: its KV cache (or its embeddings without cache)
    uncond_embeds: torch.Tensor | None = None
    uncond_h: torch.Tensor | None = None
    uncond_pos: int = 0
    result: RowResult = field(default_factory=RowResult)


def build_prefill(model: WeGenMLLM, rows_ids: list[list[int]], rows_features: list[torch.Tensor | None],
                  image_ids: ImageTokenIds, device, dtype):
    """Left-padded (B, L, H) embeddings with image slots replaced by in_proj(features), mask and positions."""
    from .prompting import image_slot_positions

    B, L = len(rows_ids), max(len(r) for r in rows_ids)
    embeds = torch.zeros(B, L, model.cfg.hidden, device=device, dtype=dtype)
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, ids in enumerate(rows_ids):
        pad = L - len(ids)
        row = model.embed_tokens(torch.tensor(ids, device=device))  # (T, H)
        starts = image_slot_positions(ids, image_ids)
        feats = rows_features[b]
        n_feats = 0 if feats is None else feats.shape[0]
        if n_feats != len(starts):
            raise ValueError(f"prompt row {b} has {len(starts)} image blocks but {n_feats} images were given")
        if starts:
            projected = model.input_resampler(feats.to(device=device, dtype=dtype))  # (n, 64, H)
            row = row.clone()
            for i, s in enumerate(starts):
                row[s:s + image_ids.n] = projected[i]
        embeds[b, pad:] = row
        mask[b, pad:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return embeds, mask, positions


def decode(model: WeGenMLLM, rows_ids: list[list[int]], rows_features: list, image_ids: ImageTokenIds,
           settings: DecodeSettings, eos_id: int, generators: list | None = None, callback=None,
           prefix: Prefix | None = None, keep_prompt_cache: bool = False) -> list[RowResult]:
    """Prefill, then one token per step for every row (B >= 1). Returns one RowResult per row.

    `prefix` (B=1, cached decode only): the prompt's first prefix.length tokens are already in
    prefix.cache (which is copied, never modified). `keep_prompt_cache` returns a copy of the cache
    right after the prefill, for the next turn of a chat to reuse.
    """
    # 1) check inputs
    if settings.feature_slice not in FEATURE_SLICES:
        raise ValueError(f"feature_slice must be one of {FEATURE_SLICES}, got {settings.feature_slice!r}")
    check_finite(settings.var_cfg_scale, "var_cfg_scale")
    if settings.var_cfg_scale < 0:
        raise ValueError(f"var_cfg_scale must be >= 0, got {settings.var_cfg_scale}")
    check_context(model, rows_ids, image_ids.n + 1 if settings.allow_image else 1)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    B = len(rows_ids)
    generators = generators or [None] * B
    rows = [_Row(prev=ids[-1]) for ids in rows_ids]

    if (prefix is not None or keep_prompt_cache) and (B != 1 or not settings.use_cache):
        raise ValueError("prefix reuse needs a single row (B=1) and the KV cache")

    # 2) prefill (only the tokens after a reused prefix)
    embeds, mask, positions = build_prefill(model, rows_ids, rows_features, image_ids, device, dtype)
    cache = new_cache(model.llm) if settings.use_cache else None
    if prefix is not None:
        if not 0 < prefix.length < embeds.shape[1]:
            raise ValueError(f"prefix of {prefix.length} tokens must be shorter than the prompt ({embeds.shape[1]})")
        if prefix.cache.get_seq_length() < prefix.length:
            raise ValueError(f"prefix cache holds {prefix.cache.get_seq_length()} tokens, fewer than {prefix.length}")
        cache = copy.deepcopy(prefix.cache)
        extra = cache.get_seq_length() - prefix.length
        if extra:
            cache.crop(-extra)  # negative = tokens to drop, on every transformers version
        h = model.forward_hidden(embeds[:, prefix.length:], mask, positions[:, prefix.length:], cache)[:, -1]
    else:
        h = model.forward_hidden(embeds, mask, positions, cache)[:, -1]  # (B, H)
    prompt_cache = copy.deepcopy(cache) if keep_prompt_cache else None
    next_pos = positions[:, -1] + 1  # (B,)
    for b, row in enumerate(rows):
        if row.prev == image_ids.start:  # prompt ends with <img> (force_image)
            _enter_image(model, row, h[b], settings)

    # 3) one token per step (the MLLM's main stream runs through fastpath's static cache on CUDA)
    step = 0
    image_steps = image_ids.n + 1
    total = image_steps if all(r.hidden for r in rows) else settings.max_new_tokens + image_steps
    runner = None
    if cache is not None and settings.stop_after_image:  # bounded length: a static cache can hold it
        from . import fastdecode

        runner = fastdecode.decode_runner(model, cache, mask, next_pos, max_steps=total)
    while not all(r.done for r in rows):
        x = _next_embeddings(model, rows, h, image_ids, settings, eos_id, generators)  # (B, H)
        if all(r.done for r in rows):
            break
        x = x[:, None]  # (B, 1, H)
        if runner is not None:
            h = runner.step(x)
        elif cache is not None:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            h = model.forward_hidden(x, mask, next_pos[:, None], cache)[:, -1]
        else:  # reference path: recompute the whole sequence
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            embeds = torch.cat([embeds, x], dim=1)
            positions = torch.cat([positions, next_pos[:, None]], dim=1)
            h = model.forward_hidden(embeds, mask, positions, None)[:, -1]
        next_pos = next_pos + 1
        for b, row in enumerate(rows):
            if not row.done and (row.prev == image_ids.start or row.prev in image_ids.slots):
                if row.prev == image_ids.start:
                    _enter_image(model, row, h[b], settings)
                else:
                    row.hidden.append(h[b])
        step += 1
        if callback is not None:
            callback({"stage": "tokens", "i": step, "total": total, "x": None})

    # 4) features
    for row in rows:
        if len(row.hidden) == image_ids.n + 1:
            hs = torch.stack(row.hidden)  # (65, H): <img>, <img_0> .. <img_63>
            chosen = hs[1:] if settings.feature_slice == "official" else hs[:-1]
            row.result.features = model.output_resampler(chosen)  # (64, feature_dim)
    rows[0].result.prompt_cache = prompt_cache
    return [r.result for r in rows]


def check_context(model: WeGenMLLM, rows_ids: list[list[int]], reserve: int):
    """Refuse a prompt that, with `reserve` tokens of reply (the image block), exceeds the model's context."""
    context = getattr(getattr(model.llm, "config", None), "max_position_embeddings", None)
    longest = max(len(ids) for ids in rows_ids)
    if isinstance(context, int) and longest + reserve > context:
        raise ValueError(f"the prompt is {longest} tokens; with the {reserve} tokens its reply needs at least, that "
                         f"exceeds the model's context of {context} tokens (max_position_embeddings): shorten the "
                         f"prompt, or start a new chat session")


def _enter_image(model, row: _Row, h, settings):
    """<img> has just been consumed: h is its hidden state; start the var-cfg stream if asked.

    Only the first image of a reply is kept, and its unconditional stream lives for the whole call.
    """
    if row.hidden:
        return
    row.hidden = [h]
    if settings.var_cfg_scale != 1.0:
        emb = model.embed_tokens(torch.tensor([row.prev], device=h.device))[None]  # (1, 1, H): <img> only
        row.uncond_cache = new_cache(model.llm) if settings.use_cache else None
        row.uncond_embeds = emb
        row.uncond_pos = 0
        row.uncond_h = _uncond_forward(model, row, emb)


def _uncond_forward(model, row: _Row, emb):
    """Advance the <img>-only unconditional stream by one embedding; returns its last hidden state."""
    dev = emb.device
    if row.uncond_cache is not None:
        pos = torch.tensor([[row.uncond_pos]], device=dev)
        mask = torch.ones(1, row.uncond_pos + 1, dtype=torch.long, device=dev)
        h = model.forward_hidden(emb, mask, pos, row.uncond_cache)[0, -1]
    else:
        embeds = row.uncond_embeds if row.uncond_pos == 0 else torch.cat([row.uncond_embeds, emb], dim=1)
        row.uncond_embeds = embeds
        T = embeds.shape[1]
        pos = torch.arange(T, device=dev)[None]
        h = model.forward_hidden(embeds, torch.ones(1, T, dtype=torch.long, device=dev), pos, None)[0, -1]
    row.uncond_pos += 1
    return h


def _next_embeddings(model, rows: list[_Row], h, image_ids, settings, eos_id, generators) -> torch.Tensor:
    """Choose every row's next token; return the (B, H) embeddings to feed (zeros for finished rows).

    Logits are computed only when some row is in text mode (a forced token needs none); greedy rows
    share one argmax and one device-to-host copy; the VAR feed-back runs once for all slot rows.
    """
    forced = [None if r.done else forced_next(r.prev, image_ids) for r in rows]
    free = [b for b, r in enumerate(rows) if not r.done and forced[b] is None]
    chosen = _pick_tokens(model, h, free, image_ids, settings, generators) if free else {}
    feed, embed = {}, {}  # row -> h to feed back (slot tokens), row -> token id (everything else)
    for b, row in enumerate(rows):
        if row.done:
            continue
        token = forced[b] if forced[b] is not None else chosen[b]
        if forced[b] is None:
            row.n_text += 1
        row.result.ids.append(token)
        row.prev = token
        if token == eos_id or (forced[b] is None and token != image_ids.start and
                               row.n_text >= settings.max_new_tokens):
            row.done = True
        if settings.count_all_tokens and len(row.result.ids) >= settings.max_new_tokens:
            row.done = True  # the release's budget: every generated token, image block included
        if token == image_ids.end and settings.stop_after_image:
            row.done = True
        if token in image_ids.slots:
            # var-cfg: h = u + s * (c - u); the features keep the raw c
            feed[b] = h[b] if row.uncond_h is None else row.uncond_h + settings.var_cfg_scale * (h[b] - row.uncond_h)
        else:
            embed[b] = token
    return _assemble_embeddings(model, rows, h, feed, embed)


def _pick_tokens(model, h, free: list[int], image_ids, settings, generators) -> dict:
    """Token ids of the text-mode rows `free` from the release's masked logits (one transfer for all)."""
    logits = mask_image_ids(model.logits(h), image_ids, settings.allow_image)  # (B, V) float32
    if settings.temperature <= 0:
        return dict(zip(free, logits[free].argmax(-1).tolist()))
    cpu = logits[free].cpu()
    return {b: sample_next_token(cpu[i], generators[b], settings.temperature, settings.top_p)
            for i, b in enumerate(free)}


def _assemble_embeddings(model, rows, h, feed: dict, embed: dict) -> torch.Tensor:
    """(B, H): in_proj(out_proj(h)) for slot rows, token embeddings for the others, zeros for finished rows."""
    weight = model.llm.model.embed_tokens.weight
    out = [torch.zeros(h.shape[-1], device=weight.device, dtype=h.dtype)] * len(rows)
    if feed:
        fed = model.feedback_embedding(torch.stack(list(feed.values())))  # (n, H)
        for i, b in enumerate(feed):
            out[b] = fed[i].to(weight.device)
            if rows[b].uncond_h is not None:
                rows[b].uncond_h = _uncond_forward(model, rows[b], fed[i][None, None])
    if embed:
        ids = torch.tensor(list(embed.values()), device=weight.device)
        for b, e in zip(embed, model.embed_tokens(ids)):
            out[b] = e
    return torch.stack(out)
