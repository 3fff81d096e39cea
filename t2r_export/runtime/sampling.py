"""Next-token choice: greedy, temperature, top-k, top-p, one seeded numpy Generator per row.

Row r of a batch draws from ``numpy.random.default_rng(seed + r)`` and draws once per token it
produces, so a row's samples do not depend on the other rows: prompt r in a batch with seed s
gives the same tokens as that prompt alone with seed s + r.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    # 0 = greedy (argmax); the usual chat default is 0.7-1.0
    temperature: float = 0.0
    # 0 = no top-k cut; 1 = greedy regardless of temperature
    top_k: int = 0
    # 1.0 = no nucleus cut
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Chooses one token per row from logits ``[B, V]``; rows are independent."""

    def __init__(self, params: SamplingParams, batch: int):
        self.params = params
        self.rngs = [np.random.default_rng(params.seed + row) for row in range(batch)]

    def __call__(self, logits: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Token ids ``[B]`` int64; only ``rows`` (default: all) are sampled, the others get -1."""
        batch = logits.shape[0]
        rows = np.arange(batch) if rows is None else np.asarray(rows)
        out = np.full(batch, -1, dtype=np.int64)
        if self.params.greedy:
            out[rows] = argmax_rows(logits)[rows]
            return out
        for row in rows:
            out[row] = sample_row(logits[row], self.params, self.rngs[row])
        return out


# the most argmax_rows copies at once: small enough to come from the C heap and be reused, not
# mapped and unmapped (glibc maps blocks of 128 KiB and more), and not to widen a server's peak
ARGMAX_CHUNK_BYTES = 64 << 10


def argmax_rows(logits: np.ndarray) -> np.ndarray:
    """Each row's argmax over the last axis of ``logits [..., V]`` (int64, as ``argmax``).

    numpy's ``argmax`` first copies a block it may not write to, and the decoders hand out their
    logits buffer read-only, so the plain call copies the whole block every step: 1 MB at 64 rows
    of a 4,096-token vocabulary, held while it reduces. Here a read-only block is reduced a few
    rows at a time (at most ``ARGMAX_CHUNK_BYTES`` copied at once); the answer is the same.
    """
    if logits.flags.writeable or logits.ndim == 1:
        return logits.argmax(axis=-1)
    rows = logits.reshape(-1, logits.shape[-1])
    step = max(1, ARGMAX_CHUNK_BYTES // max(1, rows.shape[1] * rows.itemsize))
    out = np.empty(rows.shape[0], np.int64)
    for first in range(0, rows.shape[0], step):
        out[first:first + step] = rows[first:first + step].argmax(axis=-1)
    return out.reshape(logits.shape[:-1])


def sample_row(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from logits ``[V]`` with temperature, then top-k, then top-p."""
    if params.greedy:
        return int(np.argmax(logits))
    candidates, probs = _filtered_distribution(logits.astype(np.float64) / params.temperature, params)
    cdf = np.cumsum(probs)
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(candidates[min(pick, len(candidates) - 1)])


def _filtered_distribution(scaled: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids sorted by descending logit (ties: lower id first) and their renormalised probabilities."""
    vocab = scaled.shape[0]
    if 0 < params.top_k < vocab:
        candidates = np.argpartition(-scaled, params.top_k - 1)[:params.top_k]
    else:
        candidates = np.arange(vocab)
    candidates = candidates[np.lexsort((candidates, -scaled[candidates]))]
    values = scaled[candidates]
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # the smallest prefix whose mass reaches top_p; always at least one token
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p, side="left")) + 1
        candidates, probs = candidates[:keep], probs[:keep]
        probs = probs / probs.sum()
    return candidates, probs
