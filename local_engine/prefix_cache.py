"""KV of earlier sequences, reused by the longest common token prefix (``Engine``'s prefix cache).

Agents resend the same system prompt and tool block every turn, and a conversation's next turn
starts with the whole previous one: with this cache only the tokens after the longest prefix
shared with a kept sequence are prefilled.

Why whole sequences with token-granular matching, not vLLM's hashed paged blocks: the engine
runs one sequence at a time over a contiguous preallocated ``KVCache``, so there is no block
table to share pages through, and attention reads one contiguous stripe per head. Like
llama.cpp's slot cache, an entry is the KV cache object of a finished sequence plus the token ids
it holds. A new prompt that extends an entry *takes* that cache and prefills after it (no copy:
the conversation case); one that shares only part of it (same system prompt, another
conversation) gets a fresh cache with the shared positions copied in (a memcpy of
``bytes_per_token`` per token, far cheaper than the forward pass it replaces), and the entry stays.
Matching per token rather than per 16-token block reuses up to 15 more tokens and needs no hashing.
The price: two conversations that share a system prompt hold it twice. An entry that another
extends is dropped when the longer one is stored, so one conversation costs one entry.

Bytes are counted as ``tokens x bytes_per_token`` (the KV cache is ``torch.empty``: positions past
the sequence were never written, so they are not resident). Eviction is least recently used;
an entry larger than the whole budget is not kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from local_engine.models.layers import ATTN_GROUP

DEFAULT_MB = 256  # ~5,800 tokens of SmolLM2-135M's fp32 KV (46 KB a token)
# Each entry is a whole preallocated KV cache (max_seq positions of address space, only the
# written ones resident): a bound on their number keeps the address space and the lookup small.
MAX_ENTRIES = 32


@runtime_checkable
class PositionalKV(Protocol):
    """A KV cache whose ``kv`` holds position i of the sequence at index i of dim 2: the fp32
    ``layers.KVCache`` and ``kv_cache.CompressedKVCache`` (whose ``reusable`` turns false once a
    bounded window has evicted tokens, and then it is not kept)."""

    kv: torch.Tensor
    length: int

    @property
    def bytes_per_token(self) -> int: ...

    @property
    def reusable(self) -> bool: ...

    def crop(self, n: int) -> None: ...


@dataclass
class _Entry:
    tokens: np.ndarray  # int64 ids whose K/V are positions 0..len-1 of `cache`
    cache: PositionalKV

    @property
    def nbytes(self) -> int:
        return len(self.tokens) * self.cache.bytes_per_token


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order: oldest first
        self._ids = 0
        self.nbytes = 0  # kept up to date, not summed: stats() is read from other threads
        self.lookups = self.hits = self.reused_tokens = self.evictions = 0

    def take(self, prompt: list[int], new_cache: Any) -> tuple[Any, int]:
        """A cache holding the longest kept prefix of ``prompt`` that a hit may reuse, and its length.

        That length is a multiple of ``ATTN_GROUP`` and leaves at least the prompt's last two
        tokens to run, so every new row goes through the prefill calls a fresh run makes
        (module docstring). ``new_cache()`` makes an empty cache (the model's)."""
        self.lookups += 1
        ids = np.asarray(prompt, dtype=np.int64)
        best, best_n = None, 0
        for key, e in self._entries.items():
            n = common_prefix(e.tokens, ids)
            if n > best_n:
                best, best_n = key, n
        n = min(best_n, len(ids) - 2)
        n -= n % ATTN_GROUP
        if best is None or n <= 0:
            return new_cache(), 0
        e = self._entries[best]
        if best_n == len(e.tokens):  # the prompt extends (or repeats) the entry: continue in its cache
            del self._entries[best]
            self.nbytes -= e.nbytes
            cache = e.cache
        else:  # a part of it: copy that part, the entry stays for whoever shares all of it
            self._entries.move_to_end(best)
            cache = new_cache()
            if not isinstance(cache, PositionalKV) or cache.kv.shape != e.cache.kv.shape:
                return cache, 0
            cache.kv[:, :, :n].copy_(e.cache.kv[:, :, :n])
        cache.length = n
        self.hits += 1
        self.reused_tokens += n
        return cache, n

    @contextmanager
    def lease(self, prompt: list[int], new_cache: Any) -> Iterator[tuple[Any, int]]:
        """``take`` on entry; on exit ``put`` the cache back with ``prompt``, however the block ends."""
        cache, n = self.take(prompt, new_cache)
        try:
            yield cache, n
        finally:
            self.put(prompt, cache)

    def put(self, prompt: list[int], cache: Any) -> None:
        """Keep ``cache``'s K/V of ``prompt`` (its first ``cache.length`` tokens when the prefill
        stopped early). Positions past the prompt are dropped: a decode step wrote them, with
        other sums than the prefill a later prompt would run over the same tokens."""
        if not isinstance(cache, PositionalKV) or not cache.reusable or not prompt or self.budget_bytes <= 0:
            return
        if cache.length > len(prompt):
            cache.crop(len(prompt))
        ids = np.asarray(prompt[:cache.length], dtype=np.int64)
        if not len(ids):
            return
        entry = _Entry(ids, cache)
        if entry.nbytes > self.budget_bytes:
            return
        for key, e in list(self._entries.items()):
            n = common_prefix(e.tokens, ids)
            if n == len(e.tokens):  # covered by the new one
                del self._entries[key]
                self.nbytes -= e.nbytes
            elif n == len(ids):  # the new one is covered by a kept one: refresh that instead
                self._entries.move_to_end(key)
                return
        self._ids += 1
        self._entries[self._ids] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget_bytes or len(self._entries) > MAX_ENTRIES:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_lookups": self.lookups, "prefix_cache_hits": self.hits,
                "prefix_cache_reused_tokens": self.reused_tokens, "prefix_cache_evictions": self.evictions,
                "prefix_cache_entries": len(self._entries), "prefix_cache_bytes": self.nbytes,
                "prefix_cache_budget_bytes": self.budget_bytes}
