"""T padded to whole chunks, for the chunk-parallel prefill (``prefill_graph.py``) and the window
hybrid's decay blocks (``window.py``): the padding, the real rows' mask and their indices, each made
once per graph from the shapes of the graph inputs (T is dynamic)."""

from __future__ import annotations

import numpy as np

# tokens per chunk of the prefill's chunk-parallel form (docs/design.md#prefill)
CHUNK = 64


def ones_row(e) -> str:
    """fp32 ones [1, T], shaped from position_ids (made once per graph)."""
    if getattr(e, "_ones_row", None) is None:
        g = e.g
        row = g.op("Slice", g.cast("position_ids", np.float32), g.const([0], np.int64), g.const([1], np.int64),
                   g.const([0], np.int64))                                                 # [1, T]
        e._ones_row = g.op("Add", g.op("Mul", row, g.const(0.0, np.float32)), g.const(1.0, np.float32))
    return e._ones_row


def first_rows(e) -> str:
    """0..T-1 as int64 [T], counted in fp32 from position_ids' shape (made once per graph)."""
    if getattr(e, "_first_rows", None) is None:
        g = e.g
        count = g.op("Add", g.op("CumSum", ones_row(e), g.const(1, np.int64)), g.const(-1.0, np.float32))
        e._first_rows = g.reshape(g.cast(count, np.int64), [-1])
    return e._first_rows


def _sequence_length(e) -> str:
    """T as a 1-D int64 tensor, from input_ids (made once per graph)."""
    if getattr(e, "_sequence_length", None) is None:
        e._sequence_length = e.g.op("Shape", "input_ids", start=1, end=2)
    return e._sequence_length


def chunk_padding(e, chunk: int) -> str:
    """(C - T mod C) mod C as a 1-D int64 tensor: the rows that make T whole chunks (made once per graph)."""
    cache = e.__dict__.setdefault("_chunk_padding", {})
    if chunk not in cache:
        g = e.g
        t = _sequence_length(e)
        c = g.const([chunk], np.int64)
        cache[chunk] = g.op("Mod", g.op("Sub", c, g.op("Mod", t, c)), c)
    return cache[chunk]


def pad_rows(e, chunk: int, rank: int) -> str:
    """Pads that take axis 1 of a rank-``rank`` [B, T, ...] tensor to whole chunks: (C - T mod C) mod C
    rows at its end (made once per graph, chunk and rank)."""
    cache = e.__dict__.setdefault("_pad_rows", {})
    if (chunk, rank) not in cache:
        g = e.g
        # every begin 0, every end 0 but axis 1's
        parts = [g.const([0] * (rank + 1), np.int64), chunk_padding(e, chunk)]
        if rank > 2:
            parts.append(g.const([0] * (rank - 2), np.int64))
        cache[chunk, rank] = g.op("Concat", *parts, axis=0)
    return cache[chunk, rank]


def pad_to_chunks(e, chunk: int) -> str:
    """Pads for [B, T, ...] 5-D tensors (``pad_rows``)."""
    return pad_rows(e, chunk, 5)
