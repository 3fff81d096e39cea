"""Perplexity of any Hugging Face causal LM on a flat token stream.

Works for softmax teachers and for the linear-attention (T2R) models alike: it only needs
``model(input_ids).logits``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from t2r_export.data.corpus import eval_blocks

logger = logging.getLogger(__name__)


def _batches(stream: np.ndarray, block_size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Equal-length blocks grouped into ``[b, L]`` batches, in stream order (the short tail alone)."""
    pending: list[torch.Tensor] = []
    for block in eval_blocks(stream, block_size):
        if pending and (len(pending) == batch_size or len(block) != len(pending[0])):
            yield torch.stack(pending)
            pending = []
        pending.append(block)
    if pending:
        yield torch.stack(pending)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    stream: np.ndarray,
    block_size: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Mean next-token cross-entropy (nats) and its exp over non-overlapping blocks of ``stream``.

    ``stream`` is ``[N]`` token ids; ``max_tokens`` keeps only its first tokens, so capped runs
    are deterministic. Every token after the first is predicted once, with at most ``block_size``
    tokens of context (the block it sits in). The loss is computed in fp32 whatever the model dtype.
    ``progress`` gets ``{"phase": "eval", "tokens": done, "total": total}`` after each batch.
    Returns ``{"loss": float, "perplexity": float, "tokens": int}``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (one prediction) or None, got {max_tokens}")
        stream = stream[:max_tokens]
    if len(stream) < 2:
        raise ValueError(f"the token stream has {len(stream)} tokens: expected at least 2 to predict one")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = len(stream) - 1
    loss_sum, done = 0.0, 0
    try:
        for batch in _batches(stream, block_size, batch_size):
            batch = batch.to(device)
            logits = model(batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            loss_sum += loss.item()
            done += batch[:, 1:].numel()
            if progress is not None:
                progress({"phase": "eval", "tokens": done, "total": total})
    finally:
        model.train(was_training)
    mean = loss_sum / done
    logger.info("evaluated %d tokens: loss %.4f, perplexity %.3f", done, mean, math.exp(mean))
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": done}
