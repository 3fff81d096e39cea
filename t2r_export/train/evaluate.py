"""Perplexity of any Hugging Face causal LM on a flat token stream.

Works for softmax teachers and for the linear-attention (T2R) models alike: it only needs
``model(input_ids).logits``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
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


def evaluate_models(paths: list[Path], data: list[Path] | None = None, block_size: int = 256, batch_size: int = 8,
                    max_tokens: int | None = None, progress: Callable[[dict], None] | None = None,
                    tokenizer: Path | None = None, trust_remote_code: bool = False) -> list[dict]:
    """Perplexity of each model on one token stream made with one tokenizer; rows in ``paths`` order.

    The tokenizer is ``tokenizer`` when given, else the first model's; every model must share its
    vocabulary. ``data``: local text files (default: the stdlib test split). ``progress`` gets
    ``{"phase": "tokenize"}``, ``{"phase": "load", "model": name}`` and the ``eval`` events of
    :func:`perplexity` with ``model`` added. Every cheap check (directories, tokenizers, block
    size) runs before any weights load; bad input raises ``ValueError`` (one line). A path holding a
    runtime.json is an exported bundle, scored by its step graph in ONNX Runtime on the same blocks
    (export/plan_quality.py), with top-1 agreement against the listed model it was exported from.
    """
    from t2r_export.data.corpus import read_text_files, stdlib_token_stream, tokenize_documents
    from t2r_export.data.tokenizer import load_tokenizer
    from t2r_export.models import is_t2r_model, load_causal_lm

    notify = progress or (lambda event: None)
    if block_size <= 0:
        raise ValueError(f"block size must be a positive integer, got {block_size}")
    bundles = {str(path) for path in paths if (Path(path) / "runtime.json").is_file()}
    for path in paths:
        if not Path(path).is_dir():
            raise ValueError(f"model directory not found: {path}")
        if str(path) not in bundles and not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory (no config.json) or a bundle (no runtime.json)")
    if tokenizer is not None:
        shared = load_tokenizer(tokenizer, trust_remote_code)
    else:
        tokenizers = [load_tokenizer(path, trust_remote_code) for path in paths]
        vocab = tokenizers[0].get_vocab()
        for path, other in zip(paths[1:], tokenizers[1:]):
            if other.get_vocab() != vocab:
                raise ValueError(f"{path} has a different vocabulary from {paths[0]}; eval compares models that "
                                 "share one tokenizer (or pass --tokenizer)")
        shared = tokenizers[0]
    notify({"phase": "tokenize"})
    stream = tokenize_documents(shared, read_text_files(data)) if data else stdlib_token_stream(shared, "test")
    rows = []
    for path in paths:
        name = Path(path).name
        if str(path) in bundles:
            from t2r_export.export.plan_quality import bundle_row

            notify({"phase": "load", "model": name})
            relay = lambda event, name=name: notify({**event, "model": name})  # noqa: E731
            rows.append(bundle_row(path, [p for p in paths if str(p) not in bundles], stream, block_size, batch_size,
                                   max_tokens, relay, trust_remote_code))
            continue
        notify({"phase": "load", "model": name})
        model = load_causal_lm(path, trust_remote_code=trust_remote_code)
        rows_in_vocab = model.get_input_embeddings().num_embeddings
        if len(shared) > rows_in_vocab:
            raise ValueError(f"the tokenizer has {len(shared)} tokens but {path} only {rows_in_vocab} embeddings")
        relay = lambda event, name=name: notify({**event, "model": name})  # noqa: E731
        score = perplexity(model, stream, block_size, batch_size, max_tokens, relay)
        rows.append({"model": str(path), "kind": "t2r" if is_t2r_model(model) else "softmax",
                     "params": sum(p.numel() for p in model.parameters()), **score})
        del model
    for row in rows:
        row["ratio"] = row["perplexity"] / rows[0]["perplexity"]
    return rows
