"""One stream that starts from a saved state and ends in one: ``generate --state-in / --state-out``.

The uninterrupted run feeds each sampled token through the step graph; a resumed run must do the
same to produce the same tokens, so a saved state's single pending token goes through the step
graph too (the prefill graph computes the same thing with other kernels: equal within tolerances,
not bit for bit). The sampler's generator state travels in the file, so a sampled continuation
draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .generate import GenerationError, RowOutput, RowStream, StreamCallback, Timing, check_finite
from .sampling import SamplingParams, sample_row
from .state import RowState, capture, restore


def feed_row(decoder, row: int, ids: Sequence[int], position: int, fresh: bool) -> np.ndarray:
    """Run ``ids`` at ``position`` through row ``row`` → its logits ``[1, V]`` (a copy).

    ``fresh``: the row starts from a zero state (prefill_row). Otherwise it continues its state: one
    token through the step graph, as the decode loop does, more through the prefill graph.
    """
    ids_array = np.asarray(ids, np.int64)[None]
    positions = np.arange(position, position + len(ids), dtype=np.int64)[None]
    if fresh:
        return decoder.prefill_row(row, ids_array, positions).copy()
    if len(ids) == 1 and decoder.batch == 1:
        return decoder.step(ids_array, positions).copy()
    return np.array(decoder.extend_row(row, ids_array, positions))


def generate_resumed(decoder, tokenizer, prompt_ids: Sequence[int], bundle_id: str, state: RowState | None = None,
                     max_new_tokens: int = 64, sampling: SamplingParams | None = None,
                     stop_strings: Sequence[str] | None = None,
                     stream_callback: StreamCallback | None = None) -> tuple[RowOutput, Timing, RowState]:
    """Generate for one stream, from ``state`` when given; returns its output, timing and final state."""
    config = decoder.config
    sampling = sampling or SamplingParams()
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    feed = [*(state.pending if state else []), *prompt_ids]
    if not feed:
        raise GenerationError("nothing to continue from: the saved state has no pending token and no prompt "
                              "was given; pass --prompt")
    position = state.position if state else 0
    needed = position + len(feed) + max_new_tokens
    if config.max_position is not None and needed > config.max_position:
        raise GenerationError(f"the stream needs {needed} positions, beyond the model's max_position "
                              f"{config.max_position}; lower max_new_tokens")
    bad = [t for t in feed if not 0 <= int(t) < config.vocab_size]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the model's vocabulary [0, {config.vocab_size})")
    rng = np.random.default_rng(sampling.seed)
    decoder.reset(1)
    if state is not None:
        restore(decoder, 0, state)
        if state.rng is not None:
            rng.bit_generator.state = state.rng
    stream = RowStream(tokenizer, [s for s in (stop_strings or []) if s], True)
    eos = set(config.eos_token_ids)
    start = time.perf_counter()
    logits = feed_row(decoder, 0, feed, position, fresh=state is None)
    prefill_s = time.perf_counter() - start
    position += len(feed)
    reason, produced, steps, token = None, 0, 0, None
    start = time.perf_counter()
    while reason is None:
        check_finite(logits, np.array([0]), steps)
        token = sample_row(logits[0], sampling, rng)
        produced += 1
        if token in eos:
            reason, delta = "eos", stream.finish()
        else:
            delta = stream.push(token)
            if stream.stopped:
                reason = "stop"
            elif len(stream.ids) >= max_new_tokens:
                reason, delta = "length", delta + stream.finish()
        if delta and stream_callback:
            stream_callback(0, delta)
        if reason is None:
            logits = feed_row(decoder, 0, [token], position, fresh=False)
            position += 1
            steps += 1
    decode_s = time.perf_counter() - start
    final = capture(decoder, 0, position, bundle_id, pending=[token], rng=rng)
    output = RowOutput(stream.text, stream.ids, reason, len(feed))
    return output, Timing(prefill_s, decode_s, produced, steps), final
