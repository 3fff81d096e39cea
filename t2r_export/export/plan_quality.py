"""Perplexity of an exported bundle on a token stream, beside the torch models ``t2r-export eval`` scores.

    t2r-export eval t2r_export/teacher/t2r bundles/int4 bundles/int4-qdq --max-tokens 200000

A bundle is scored on exactly the blocks ``train.evaluate.perplexity`` uses (non-overlapping
blocks of ``block_size`` + 1 tokens, every token after a block's first predicted once): its step
graph runs in ONNX Runtime on the CPU, a batch of blocks as rows, from a zero state at each block's
start, teacher-forced. With ``reference`` (the fp32 torch model the bundle was exported from) the
same blocks also give top-1 agreement: how often the bundle's next-token argmax is the model's.
The ONNX Runtime session is the one the export check uses (plan_check.py), so the figures are
those of the graph as exported (docs/design.md#precision-plan).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import contract


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def _batches(blocks, batch_size: int):
    """Equal-length blocks stacked ``[b, L]`` in stream order, as ``eval`` batches them (the short tail alone)."""
    pending: list[np.ndarray] = []
    for block in blocks:
        if pending and (len(pending) == batch_size or len(block) != len(pending[0])):
            yield np.stack(pending)
            pending = []
        pending.append(block.numpy())
    if pending:
        yield np.stack(pending)


def bundle_perplexity(bundle, stream: np.ndarray, block_size: int = 256, batch_size: int = 8,
                      max_tokens: int | None = None, reference=None, threads: int = 0,
                      progress: Callable[[dict], None] | None = None) -> dict:
    """``{"loss", "perplexity", "tokens", "agreement"}`` of ``bundle`` (a loaded runtime Bundle) over
    ``stream``'s eval blocks; agreement is None without a ``reference`` torch model."""
    import torch

    from ..data.corpus import eval_blocks
    from .plan_check import plan_session

    config = bundle.config
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if len(stream) < 2:
        raise ValueError(f"the token stream has {len(stream)} tokens: expected at least 2 to predict one")
    if int(stream.max()) >= config.vocab_size:
        raise ValueError(f"the token stream holds id {int(stream.max())}, {bundle.path} has {config.vocab_size} "
                         "tokens; eval bundles with the tokenizer they ship")
    session = plan_session(bundle.graph_path(contract.STEP), config.precision, threads)
    pairs = contract.state_pairs(config.num_layers, config.state_shape.parts)
    specs, _ = config.graph_specs(contract.STEP)
    states = [s for s in specs if contract.is_state(s.name)]
    outputs = ["logits"] + [present for _, present in pairs]
    notify = progress or (lambda event: None)
    total, loss_sum, done, agree = len(stream) - 1, 0.0, 0, 0
    for ids in _batches(eval_blocks(stream, block_size), batch_size):
        rows, length = ids.shape
        state = {s.name: np.zeros((rows, *s.shape[1:]), s.dtype) for s in states}
        logits = np.empty((rows, length - 1, config.vocab_size), np.float32)
        for t in range(length - 1):
            feed = {"input_ids": ids[:, t:t + 1], "position_ids": np.full((rows, 1), t, np.int64), **state}
            values = session.run(outputs, feed)
            logits[:, t] = values[0][:, :config.vocab_size]
            state = {past: v for (past, _), v in zip(pairs, values[1:])}
        targets = ids[:, 1:]
        picked = np.take_along_axis(_log_softmax(logits), targets[..., None], -1)
        loss_sum -= float(picked.sum())
        done += targets.size
        if reference is not None:
            with torch.no_grad():
                ref = reference(torch.from_numpy(ids[:, :-1]), use_cache=False).logits.numpy()
            agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
        notify({"phase": "eval", "tokens": done, "total": total})
    mean = loss_sum / done
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": done,
            "agreement": agree / done if reference is not None else None}


def source_model(bundle, model_dirs: list[Path]) -> Path | None:
    """The model folder among ``model_dirs`` whose safetensors ``bundle`` was exported from (sha256), or None."""
    from .bundle import checkpoint_sha256

    wanted = bundle.config.source_checkpoint_sha256
    for path in model_dirs:
        if wanted and checkpoint_sha256(Path(path), None) == wanted:
            return Path(path)
    return None


def bundle_row(bundle_dir: str | Path, model_dirs: list[Path], stream: np.ndarray, block_size: int, batch_size: int,
               max_tokens: int | None, progress: Callable[[dict], None] | None = None,
               trust_remote_code: bool = False) -> dict:
    """One ``eval`` row for a bundle: its perplexity, and its agreement with its source model when listed."""
    from ..models import load_causal_lm
    from ..runtime.bundle import load_bundle

    bundle = load_bundle(Path(bundle_dir))
    source = source_model(bundle, model_dirs)
    reference = load_causal_lm(source, trust_remote_code=trust_remote_code) if source is not None else None
    score = bundle_perplexity(bundle, stream, block_size, batch_size, max_tokens, reference, progress=progress)
    return {"model": str(bundle_dir), "kind": f"bundle {bundle.config.precision}", "params": None, **score,
            "agreement_with": str(source) if source is not None else None}


__all__ = ["bundle_perplexity", "bundle_row", "source_model"]
