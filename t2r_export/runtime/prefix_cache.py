"""States of prompt prefixes, reused by later prompts that start the same way (a system prompt, a
few-shot preamble): keyed by (bundle identity, token ids), least recently used first out, bounded
in bytes. A T2R state does not grow with the prefix, so an entry costs the same for 10 tokens or
10,000: the state plus the next-token logits (so an exact hit needs no graph call at all).

    cache = PrefixCache(max_bytes=64 << 20)
    logits, hit = prefill_cached(decoder, row, ids, cache, identity)   # prefills only what is new

Torch-free.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class CacheEntry:
    tensors: dict[str, np.ndarray]
    logits: np.ndarray           # next-token logits after the prefix, [1, V]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values()) + self.logits.nbytes


class PrefixCache:
    """LRU map (bundle identity, token ids) -> state after those ids; thread-safe; ``max_bytes`` bound."""

    def __init__(self, max_bytes: int = 64 << 20, min_tokens: int = 1):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], CacheEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple[str, tuple[int, ...]]]:
        with self._lock:
            return list(self._entries)

    def put(self, identity: str, ids, tensors: dict[str, np.ndarray], logits: np.ndarray) -> bool:
        """Store the state after ``ids``; False when it alone exceeds the bound (nothing is stored)."""
        ids = tuple(int(t) for t in ids)
        if len(ids) < self.min_tokens:
            return False
        entry = CacheEntry({k: np.array(v, copy=True) for k, v in tensors.items()},
                           np.array(logits, dtype=np.float32, copy=True).reshape(1, -1))
        if entry.nbytes > self.max_bytes:
            return False
        key = (identity, ids)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
        return True

    def longest(self, identity: str, ids) -> tuple[int, CacheEntry | None]:
        """(length, entry) of the longest cached prefix of ``ids`` for this bundle, or (0, None)."""
        ids = tuple(int(t) for t in ids)
        best, found = 0, None
        with self._lock:
            for key, entry in self._entries.items():
                owner, prefix = key
                if owner == identity and best < len(prefix) <= len(ids) and ids[:len(prefix)] == prefix:
                    best, found = len(prefix), key
            if found is None:
                self.misses += 1
                return 0, None
            self._entries.move_to_end(found)
            self.hits += 1
            return best, self._entries[found]


def prefill_cached(decoder, row: int, ids, cache: PrefixCache | None, identity: str,
                   cache_points=()) -> tuple[np.ndarray, int]:
    """Prefill ``ids`` into ``row`` through ``cache`` → (next-token logits ``[1, V]``, cached tokens reused).

    The longest cached prefix's state is restored and only the rest is prefilled. The state after
    the whole prompt is stored, and so is the state at each of ``cache_points`` (token counts, e.g.
    where a chat's system prompt ends) that lies past the reused prefix.
    """
    ids = [int(t) for t in ids]
    reused, entry = cache.longest(identity, ids) if cache is not None else (0, None)
    position, logits = 0, None
    if entry is not None:
        decoder.write_row(row, entry.tensors)
        position, logits = reused, entry.logits
    points = sorted(p for p in set(cache_points) if reused < p < len(ids))
    for end in [*points, len(ids)]:
        if end == position:
            continue
        chunk = np.asarray(ids[position:end], np.int64)[None]
        positions = np.arange(position, end, dtype=np.int64)[None]
        if position == 0:
            logits = np.array(decoder.prefill_row(row, chunk, positions))
        else:
            logits = np.array(decoder.extend_row(row, chunk, positions))
        position = end
        if cache is not None:
            cache.put(identity, ids[:end], decoder.read_row(row), logits)
    return np.array(logits, copy=True), reused
