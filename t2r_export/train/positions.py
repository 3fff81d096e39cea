"""Perplexity by position: does the model use context beyond its window and its training length?

Long sequences of a concatenated token stream (the stdlib test files one after another) are fed
in chunks, each continuing from the previous one's state: a T2R model carries its recurrent state,
a softmax model its KV cache. Every prediction's loss is binned by the position it was made at
(``BUCKETS``: 0-256, 256-1k, 1k-4k, 4k-16k by default). With a sliding window, ``parts`` runs the
ablations: "linear" masks the window (only phi over the keys that left it), "window" masks the
linear part.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

BUCKETS = (0, 256, 1024, 4096, 16384)


def bucket_labels(edges=BUCKETS) -> list[str]:
    def short(n: int) -> str:
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

    return [f"{short(a)}-{short(b)}" for a, b in zip(edges[:-1], edges[1:])]


@torch.no_grad()
def _token_losses(model, ids: torch.Tensor, chunk: int, parts: str) -> torch.Tensor:
    """Next-token losses [L-1] of one sequence ids [1, L], fed ``chunk`` tokens at a time."""
    from t2r_export.models import is_t2r_model, new_state

    t2r = is_t2r_model(model)
    state = new_state(model, 1) if t2r else None
    cache = None
    losses = []
    for start in range(0, ids.shape[1] - 1, chunk):
        piece = ids[:, start : start + chunk + 1]
        positions = torch.arange(start, start + piece.shape[1] - 1, device=ids.device)[None]
        if t2r:
            extra = {} if parts == "both" else {"t2r_parts": parts}
            logits = model(piece[:, :-1], position_ids=positions, t2r_state=state, t2r_form="parallel",
                           use_cache=False, **extra).logits
        else:
            out = model(piece[:, :-1], position_ids=positions, cache=cache, use_cache=True)
            logits, cache = out.logits, out.cache
        losses.append(F.cross_entropy(logits[0].float(), piece[0, 1:], reduction="none"))
    return torch.cat(losses)


def position_perplexity(model, stream: np.ndarray, length: int = BUCKETS[-1], sequences: int = 1,
                        chunk: int = 256, edges=BUCKETS, parts: str = "both",
                        progress: Callable[[dict], None] | None = None) -> dict:
    """Perplexity per position bucket over ``sequences`` consecutive pieces of ``length`` + 1 tokens.

    Returns {"buckets": labels, "perplexity": [...], "tokens": [...], "positions": length}.
    """
    if length < 2 or length > edges[-1]:
        raise ValueError(f"length must be between 2 and {edges[-1]}, got {length}")
    if sequences <= 0 or chunk <= 0:
        raise ValueError(f"sequences and chunk must be positive integers, got {sequences} and {chunk}")
    needed = sequences * (length + 1)
    if len(stream) < needed:
        raise ValueError(f"the token stream has {len(stream):,} tokens: {sequences} sequence(s) of {length:,} "
                         f"positions need {needed:,}; lower --positions-length or --sequences")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1, dtype=np.int64)
    try:
        for n in range(sequences):
            ids = torch.as_tensor(stream[n * (length + 1) : (n + 1) * (length + 1)], dtype=torch.long, device=device)
            losses = _token_losses(model, ids[None], chunk, parts).cpu().numpy()
            # the prediction made at position p (0-based) is the loss of token p + 1
            index = np.searchsorted(edges, np.arange(len(losses)), side="right") - 1
            np.add.at(sums, index, losses)
            np.add.at(counts, index, 1)
            if progress is not None:
                progress({"phase": "eval", "tokens": (n + 1) * length, "total": sequences * length})
    finally:
        model.train(was_training)
    ppl = [math.exp(s / c) if c else None for s, c in zip(sums, counts)]
    return {"buckets": bucket_labels(edges), "perplexity": ppl, "tokens": counts.tolist(), "positions": length}


def plot_positions(rows: list[dict], path) -> None:
    """One line per model (and ablation): perplexity against the position bucket, log scale (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        xs = [i for i, p in enumerate(row["perplexity"]) if p is not None]
        ax.plot(xs, [row["perplexity"][i] for i in xs], marker="o", label=row["label"],
                linestyle="--" if row["parts"] != "both" else "-")
    ax.set_xticks(range(len(rows[0]["buckets"])), rows[0]["buckets"])
    ax.set_yscale("log")
    ax.set_xlabel("position of the prediction (tokens of context before it)")
    ax.set_ylabel("perplexity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
