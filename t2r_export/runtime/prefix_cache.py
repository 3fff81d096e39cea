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
                   cache_points=(), max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """Prefill ``ids`` into ``row`` through ``cache`` → (next-token logits ``[1, V]``, cached tokens reused).

    The longest cached prefix's state is restored and only the rest is prefilled. The state after
    the whole prompt is stored, and so is the state at each of ``cache_points`` (token counts, e.g.
    where a chat's system prompt ends) that lies past the reused prefix. ``max_tokens``: as for
    :func:`prefill_many`.
    """
    return prefill_many(decoder, row, [ids], cache, identity, [cache_points], max_tokens)[0]


def prefill_many(decoder, first_row: int, prompts, cache: PrefixCache | None, identity: str,
                 cache_points=None, max_tokens: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Prefill ``prompts[i]`` into row ``first_row + i`` through ``cache``, as :func:`prefill_cached`
    does for each → one (logits ``[1, V]``, cached tokens reused) per prompt.

    Consecutive prompts that start afresh (no cached prefix) with first segments of equal length
    (the whole prompt, or up to its first cache point) are prefilled together in one graph call
    (``decoder.prefill_rows``); the rest of each prompt goes on row by row. Order the prompts by
    that length to make the groups large. A row prefilled in a group equals it prefilled alone up
    to the batched-vs-single-row tolerance (t2r_export/tolerances.py).

    ``max_tokens``: the most tokens (rows x length) one graph call takes, so a prefill's working
    memory is bounded whatever the prompts' lengths: a group is split by rows, and a longer
    prompt goes on in pieces of at most this many tokens (a T2R state continues exactly).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    prompts = [[int(t) for t in ids] for ids in prompts]
    cache_points = cache_points or [()] * len(prompts)
    plans = []
    for ids, points in zip(prompts, cache_points):
        reused, entry = cache.longest(identity, ids) if cache is not None else (0, None)
        ends = [*sorted(p for p in set(points) if reused < p < len(ids)), len(ids)]
        plans.append((reused, entry, [e for e in ends if e != reused]))
    logits: list[np.ndarray | None] = [None] * len(prompts)
    # tokens of each prompt the grouped calls below took
    done = [reused for reused, _, _ in plans]
    index = 0
    while index < len(prompts):
        reused, entry, ends = plans[index]
        if entry is not None or not ends:
            index += 1
            continue
        # the run of fresh prompts from here whose first segments have this length
        stop = index + 1
        while stop < len(prompts) and plans[stop][1] is None and plans[stop][2][:1] == ends[:1]:
            stop += 1
        length = ends[0] if max_tokens is None else min(ends[0], max_tokens)
        rows = stop - index if max_tokens is None else max(1, max_tokens // length)
        for start in range(index, stop, rows):
            end = min(start + rows, stop)
            chunk = np.asarray([ids[:length] for ids in prompts[start:end]], np.int64)
            positions = np.tile(np.arange(length, dtype=np.int64), (end - start, 1))
            group = np.array(decoder.prefill_rows(first_row + start, chunk, positions))
            for offset in range(end - start):
                i = start + offset
                logits[i], done[i] = group[offset:offset + 1], length
                if cache is not None and length == ends[0]:
                    cache.put(identity, prompts[i][:length], decoder.read_row(first_row + i), logits[i])
        index = stop
    results = []
    for i, (ids, (reused, entry, ends)) in enumerate(zip(prompts, plans)):
        row, position, last = first_row + i, done[i], logits[i]
        if entry is not None:
            decoder.write_row(row, entry.tensors)
            last = entry.logits
        for end in ends:
            while position < end:
                piece = end if max_tokens is None else min(end, position + max_tokens)
                chunk = np.asarray(ids[position:piece], np.int64)[None]
                last = np.array(decoder.extend_row(row, chunk, np.arange(position, piece, dtype=np.int64)[None]))
                position = piece
            if cache is not None and end > done[i]:
                cache.put(identity, ids[:end], decoder.read_row(row), last)
        results.append((np.array(last, copy=True), reused))
    return results
