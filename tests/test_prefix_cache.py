"""The prefix LRU (wegen/prefix_cache.py) on its own: longest-prefix lookup, image digests, the byte bound."""
import pytest
import torch

from wegen import prefix_cache


class _FakeLayer:
    def __init__(self, n):
        self.keys = torch.zeros(1, 1, n, 4)  # 16 bytes per token
        self.values = torch.zeros(1, 1, n, 4)


class _FakeCache:
    def __init__(self, n):
        self.layers = [_FakeLayer(n)]


def test_prefix_cache_longest_prefix_digests_and_byte_bound():
    cache = prefix_cache.PrefixCache(max_bytes=32 * 34)
    a = list(range(10))
    cache.store(a, {2: "x"}, _FakeCache(10))
    assert cache.nbytes == 320 and prefix_cache.cache_nbytes(_FakeCache(3)) == 96
    assert cache.lookup(a + [99, 98], {2: "x"}).length == 10
    assert cache.lookup(a + [99], {2: "other"}).length == 2  # the block at 2 differs: reuse stops there
    assert cache.lookup(a[:5] + [50, 51], {2: "x"}).length == 5
    assert cache.lookup(a, {2: "x"}).length == 9  # one token must stay to prefill
    assert cache.lookup([7, 7, 7], {}) is None
    cache.store(a + [10, 11], {2: "x"}, _FakeCache(12))  # contains the first entry: it goes
    assert len(cache) == 1 and cache.nbytes == 384
    cache.store([5, 5, 5, 5], {}, _FakeCache(4))
    cache.lookup(a + [10, 11, 12], {2: "x"})  # touch: the long entry is now the most recent
    cache.store([6] * 20, {}, _FakeCache(20))  # 640 + 384 + 128 > 1088: the least recent (the [5]*4 one) goes
    assert cache.lookup([5, 5, 5, 5, 1], {}) is None and cache.lookup(a + [10, 11, 12], {2: "x"}).length == 12
    assert cache.nbytes <= cache.max_bytes
    cache.store([1] * 100, {}, _FakeCache(100))  # larger than the whole budget: not kept
    assert cache.lookup([1] * 101, {}) is None
    with pytest.raises(ValueError, match="max_bytes"):
        prefix_cache.PrefixCache(-1)
