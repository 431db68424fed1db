"""The prompt-prefix cache: KV caches of earlier prompts, reused when a new prompt starts with one of them.

Each WeGenEngine owns one (engine.prefix_cache, byte-bounded, cleared by engine.release): a chat turn's prompt
holds every earlier turn, so the next turn finds its history's KV cache here and prefills only its new tokens,
re-encoding no past image. Entries are keyed by token ids plus a digest of every image block's features, so a
prompt with the same ids but other image features never reuses a cache. An extension (the release keeps no
history).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import mllm, prompting

DEFAULT_PREFIX_CACHE_BYTES = 1 << 30  # 1 GiB: ~2000 tokens of Llama-2-7B KV in bf16


def cache_nbytes(cache) -> int:
    """Bytes of a transformers KV cache's key/value tensors (5.x `layers`, 4.x `key_cache`/`value_cache`)."""
    tensors = []
    for layer in getattr(cache, "layers", None) or []:
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    tensors += list(getattr(cache, "key_cache", None) or []) + list(getattr(cache, "value_cache", None) or [])
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def block_digests(ids: list[int], features: torch.Tensor | None, image_ids) -> dict:
    """{slot start position: sha256 of that block's (64, C) float32 features} for a prompt."""
    starts = prompting.image_slot_positions(ids, image_ids)
    if not starts:
        return {}
    f = features.detach().float().cpu().contiguous()
    return {s: hashlib.sha256(f[i].numpy().tobytes()).hexdigest() for i, s in enumerate(starts)}


@dataclass
class _Entry:
    ids: tuple
    blocks: dict
    cache: object
    nbytes: int


class PrefixCache:
    """Prompt KV caches keyed by token ids + image-block digests; lookup finds the longest shared prefix."""

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._entries)

    def clear(self):
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    @staticmethod
    def shared_length(entry: _Entry, ids, blocks: dict) -> int:
        """Tokens of `ids` whose KV `entry` holds: equal ids, and equal features for every block started inside."""
        n, limit = 0, min(len(entry.ids), len(ids))
        while n < limit and entry.ids[n] == ids[n]:
            n += 1
        for start in set(entry.blocks) | set(blocks):
            if start < n and entry.blocks.get(start) != blocks.get(start):
                n = start
        return n

    def lookup(self, ids, blocks: dict) -> mllm.Prefix | None:
        """The longest stored prefix of `ids` (at most len(ids) - 1 tokens: one must stay to prefill)."""
        ids = tuple(ids)
        with self._lock:
            best, best_len = None, 0
            for key, entry in self._entries.items():
                n = min(self.shared_length(entry, ids, blocks), len(ids) - 1)
                if n > best_len:
                    best, best_len = key, n
            if best is None:
                return None
            self._entries.move_to_end(best)
            return mllm.Prefix(self._entries[best].cache, best_len)

    def store(self, ids, blocks: dict, cache):
        """Keep the prompt cache of `ids`; drops entries it contains, then the least recently used over budget."""
        entry = _Entry(tuple(ids), dict(blocks), cache, cache_nbytes(cache))
        if entry.nbytes > self.max_bytes:
            return
        key = (entry.ids, tuple(sorted(entry.blocks.items())))
        with self._lock:
            contained = [k for k, e in self._entries.items()
                         if self.shared_length(e, entry.ids, entry.blocks) == len(e.ids)]
            for k in contained:
                self.nbytes -= self._entries.pop(k).nbytes
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes:
                self.nbytes -= self._entries.popitem(last=False)[1].nbytes
