"""Prompt Self-Rewriting (PSR): the MLLM rewrites one prompt into K detailed prompts. EXTENSION.

The release does not ship PSR (shared/reference/wegen-official-architecture.md, section 4): it decodes
greedily, so one prompt always gives one picture. The paper (arXiv 2503.01115) describes PSR as the
MLLM rewriting a vague prompt to inject diversity; its template and sampling settings are not public.
This module is a reconstruction from that description, labelled "extension" everywhere it surfaces.

How one call works:
  1. the request = `template` with `{prompt}` replaced by the user's prompt (plain text replace, so
     braces elsewhere are harmless); it is sent as a chat turn ("[INST] request [/INST]\\n", task="chat");
  2. K rows are decoded in one batch (left-padded; image tokens banned), row i sampled with its own
     torch.Generator seeded `seed + i` at `temperature` / `top_p`;
  3. each reply is cleaned (tags stripped like the release's reply regex, control characters dropped,
     whitespace collapsed, a leading "Prompt:" label or surrounding quotes removed) and capped at
     `max_chars` on a word boundary (the token cap is `max_new_tokens`);
  4. empty replies and duplicates (case- and whitespace-insensitive, against the original too when it
     is kept) are re-sampled in one more batch with fresh seeds (continuing seed + K, seed + K + 1, ...)
     up to `max_rounds` rounds in all; if K distinct prompts still are not there, a ValueError says so.
Everything is deterministic for a seed: the seeds consumed, and so the result, depend only on the inputs.

The template is editable (argument, node widget, `--template` on the command line). It must contain
`{prompt}` once. DEFAULT_TEMPLATE below asks for one detailed paragraph that keeps the subject.
"""
from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field

from .rules import MAX_NEW_TOKENS_WIDGET, check_finite, check_seed, seed_rows

log = logging.getLogger(__name__)

# The editable instruction (an extension: the paper's own template is not published).
DEFAULT_TEMPLATE = (
    "Rewrite the image prompt below into one detailed, vivid prompt for an image generator. "
    "Keep its subject, and choose a specific setting, composition, lighting, colour palette and style. "
    "Reply with the new prompt only, as one paragraph.\n"
    "Prompt: {prompt}"
)
PLACEHOLDER = "{prompt}"
MAX_N = 256  # rewrites per call: a bound on one batched decode
DEFAULT_MAX_ROUNDS = 4  # batched decodes per call, re-sampling included
# Sampling defaults of one call (the node's widgets and the CLI's options use these)
DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_CHARS = 0.9, 0.95, 96, 400
_LABEL = re.compile(r"^\s*(?:(?:new|rewritten|detailed|image)\s+)?prompt\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'\u201c\u201d\u2018\u2019"


@dataclass
class RewriteResult:
    """K prompts (the original first when kept) and the sampling seed of each (None for the original)."""

    prompts: list[str]
    seeds: list[int | None]
    source: str
    settings: dict = field(default_factory=dict)
    rounds: int = 1  # batched decodes it took (1 = no re-sampling)

    def records(self) -> list[dict]:
        """One JSON-ready dict per rewrite (what `python -m wegen rewrite` prints, one per line)."""
        return [{"index": i, "prompt": p, "seed": s, "original": s is None, "source": self.source}
                for i, (p, s) in enumerate(zip(self.prompts, self.seeds))]


def check_rewrite_inputs(prompt, n, seed, temperature, top_p, max_new_tokens, max_chars, template, max_rounds,
                         keep_original):
    """ValueError naming the input, the value and what is allowed; nothing is run before this passes."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ValueError(f"n (number of rewrites, K) must be an integer in 1..{MAX_N}, got {n!r}")
    check_seed(seed)
    check_finite(temperature, "temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            not 1 <= max_new_tokens <= MAX_NEW_TOKENS_WIDGET:
        raise ValueError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS_WIDGET}, got {max_new_tokens!r}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 8:
        raise ValueError(f"max_chars (length cap of one rewrite) must be an integer >= 8, got {max_chars!r}")
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise ValueError(f"template must be a string containing {PLACEHOLDER} exactly once, got {template!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or not 1 <= max_rounds <= 64:
        raise ValueError(f"max_rounds (batched decodes, re-sampling included) must be in 1..64, got {max_rounds!r}")
    sampled = n - (1 if keep_original else 0)
    if temperature == 0 and sampled > 1:
        raise ValueError(f"temperature 0 decodes greedily, so all {sampled} sampled rewrites would be the same; "
                         f"use temperature > 0 (e.g. 0.9) for n={n}")


def build_request(template: str, prompt: str) -> str:
    """The user turn sent to the MLLM: the template with {prompt} replaced (no str.format: braces are kept)."""
    return template.replace(PLACEHOLDER, prompt.strip())


def finalize(text: str, max_chars: int) -> str:
    """Raw reply -> one clean prompt line: tags gone, whitespace collapsed, label/quotes stripped, length capped."""
    from .prompting import clean_reply

    text = "".join(ch for ch in clean_reply(text) if ch.isspace() or unicodedata.category(ch)[0] != "C")
    text = " ".join(text.split())
    text = _LABEL.sub("", text).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = max_chars if text[max_chars] == " " else cut.rfind(" ")
        text = (cut[:space] if space >= max_chars // 2 else cut).rstrip(" ,;:-")
    return text


def dedupe_key(text: str) -> str:
    """Case- and whitespace-insensitive identity of a prompt."""
    return " ".join(text.casefold().split())


def rewrite_prompt(engine, prompt: str, n: int, *, seed: int = 0, temperature: float = DEFAULT_TEMPERATURE,
                   top_p: float = DEFAULT_TOP_P, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   max_chars: int = DEFAULT_MAX_CHARS, keep_original: bool = False,
                   template: str = DEFAULT_TEMPLATE, max_rounds: int = DEFAULT_MAX_ROUNDS,
                   callback=None) -> RewriteResult:
    """One prompt -> K distinct rewrites, all sampled in one batched decode (+ re-sampling rounds). Extension.

    Args:
        engine: a WeGenEngine (its MLLM and tokenizer are used; no image is generated).
        prompt: the user's (vague) prompt.
        n: K, how many prompts to return (the original counts as one when keep_original).
        seed: row i of the first batch samples with seed + i; re-sampling continues with seed + K, ...
        temperature, top_p: text sampling (temperature 0 is greedy, so only one rewrite is possible).
        max_new_tokens: token cap of one rewrite; max_chars: character cap after cleaning.
        keep_original: return the prompt itself as the first of the K.
        template: the instruction, with {prompt} where the user's prompt goes (see DEFAULT_TEMPLATE).
        max_rounds: batched decodes allowed in all before giving up with a ValueError.
        callback: engine-style progress callback (stage "tokens").
    """
    check_rewrite_inputs(prompt, n, seed, temperature, top_p, max_new_tokens, max_chars, template, max_rounds,
                         keep_original)
    from . import mllm, prompting

    source = " ".join(prompt.split())
    ids = prompting.prompt_ids(engine.tokenizer, [prompting.Turn(user=build_request(template, source))],
                               engine.mllm_cfg.n_query, "chat")
    settings = mllm.DecodeSettings(max_new_tokens=max_new_tokens, temperature=float(temperature),
                                   top_p=float(top_p), allow_image=False)
    kept: list[tuple[str, int | None]] = [(source, None)] if keep_original else []
    seen = {dedupe_key(source)} if keep_original else set()
    next_seed, rounds = seed, 0
    while len(kept) < n and rounds < max_rounds:
        missing = n - len(kept)
        seeds = seed_rows(next_seed, missing + 1)  # the last one starts the next round
        seeds, next_seed = seeds[:-1], seeds[-1]
        rounds += 1
        results = engine.generate_tokens([ids] * missing, [None] * missing, settings, seeds, callback)
        for s, r in zip(seeds, results):
            text = finalize(engine.reply_text(r.ids), max_chars)
            if text and dedupe_key(text) not in seen:
                seen.add(dedupe_key(text))
                kept.append((text, s))
        log.info("rewrite round %d: %d of %d prompts distinct", rounds, len(kept), n)
    if len(kept) < n:
        raise ValueError(f"got only {len(kept)} distinct non-empty rewrites of n={n} after {rounds} batched decodes "
                         f"(max_rounds={max_rounds}); raise temperature ({temperature}) or top_p ({top_p}), "
                         f"raise max_rounds, or lower n")
    return RewriteResult(
        prompts=[t for t, _ in kept], seeds=[s for _, s in kept], source=source, rounds=rounds,
        settings=dict(n=n, seed=seed, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                      max_chars=max_chars, keep_original=keep_original, template=template, max_rounds=max_rounds))
