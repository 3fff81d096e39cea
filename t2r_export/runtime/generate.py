"""Batched text generation over any decoder backend (ONNX Runtime now, TensorRT later).

Each prompt is prefilled alone (batch 1: rows have different lengths, and padding tokens would
be summed into a linear-attention state), straight into its row of the batch state; then all rows
decode together with the step graph, each at its own position. A row finishes on EOS, a stop
string or ``max_new_tokens``, independently. Finished rows stay in the batch and keep stepping the
pad token at a frozen position, their output frozen: the batch shape and every IO binding stay
fixed, and the loop ends as soon as every row has finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from .bundle import RuntimeConfig
from .sampling import Sampler, SamplingParams

StreamCallback = Callable[[int, str], None]


class GenerationError(ValueError):
    """A prompt or setting the model cannot serve (empty, out-of-vocabulary id, too long)."""


class NonFiniteLogitsError(RuntimeError):
    """The graph produced NaN or inf logits (for example an fp16 overflow)."""


class Decoder(Protocol):
    """What :func:`generate` needs from a backend; ``OrtDecoder`` and the TensorRT decoder implement it."""

    config: RuntimeConfig

    def reset(self, batch: int) -> None: ...

    def prefill_row(self, row: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray: ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray: ...


@dataclass
class RowOutput:
    text: str                      # generated text only, cut before a stop string
    token_ids: list[int]           # generated ids (EOS excluded; the ids that spelled a stop string included)
    finish_reason: str             # "eos" | "stop" | "length"
    prompt_tokens: int


@dataclass
class Timing:
    prefill_s: float               # all rows' prefill calls together
    decode_s: float                # from the end of prefill to the last token
    decode_tokens: int             # tokens produced by all rows (EOS included)
    steps: int                     # step-graph calls

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("inf")


@dataclass
class GenerationResult:
    rows: list[RowOutput]
    timing: Timing

    @property
    def texts(self) -> list[str]:
        return [row.text for row in self.rows]


def generate(decoder: Decoder, tokenizer, prompts: Sequence[str] | str, max_new_tokens: int = 64,
             sampling: SamplingParams | None = None, stop_strings: Sequence[str] | None = None,
             stream_callback: StreamCallback | None = None, add_bos: bool = False) -> GenerationResult:
    """Encode ``prompts`` with ``tokenizer`` (a ``tokenizers.Tokenizer``) and generate for all at once.

    ``add_bos`` prepends ``bos_token_id`` when the tokenizer's own post-processor did not.
    ``stream_callback(row, text_delta)`` receives text as it is produced; the deltas of a row
    concatenate to that row's final text.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise GenerationError("no prompts given")
    prompt_ids = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise GenerationError(f"{_which(index, len(prompts))} is a {type(prompt).__name__}, expected text (str)")
        if not prompt:
            raise GenerationError(f"{_which(index, len(prompts))} is empty; give at least one character of text")
        check_text(prompt, _which(index, len(prompts)))
        ids = tokenizer.encode(prompt, add_special_tokens=True).ids
        bos = decoder.config.bos_token_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        prompt_ids.append(ids)
    return generate_ids(decoder, tokenizer, prompt_ids, max_new_tokens, sampling, stop_strings, stream_callback)


def generate_ids(decoder: Decoder, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None, stop_strings: Sequence[str] | None = None,
                 stream_callback: StreamCallback | None = None) -> GenerationResult:
    """:func:`generate` from token ids; ``tokenizer`` only decodes."""
    config = decoder.config
    check_prompts(prompt_ids, config, max_new_tokens)
    stops = [s for s in (stop_strings or []) if s]
    batch = len(prompt_ids)
    sampler = Sampler(sampling or SamplingParams(), batch)
    # without a callback or stop strings nothing needs text before the end: decode each row once
    incremental = bool(stream_callback or stops)
    streams = [_RowStream(tokenizer, stops, incremental) for _ in range(batch)]
    reasons: list[str | None] = [None] * batch

    start = time.perf_counter()
    logits = prefill_rows(decoder, prompt_ids)
    prefill_s = time.perf_counter() - start

    def finish(row: int, reason: str, delta: str) -> None:
        reasons[row] = "stop" if streams[row].stopped else reason
        if delta and stream_callback:
            stream_callback(int(row), delta)

    eos = set(config.eos_token_ids)
    filler = config.filler_token_id
    # the position of the next token each row feeds; frozen once the row finishes
    positions = np.array([len(ids) for ids in prompt_ids], dtype=np.int64)
    input_ids = np.full((batch, 1), filler, dtype=np.int64)
    produced, steps = 0, 0
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        active = np.array([reason is None for reason in reasons])
        rows = np.flatnonzero(active)
        _check_finite(logits, rows, steps)
        tokens = sampler(logits, rows)
        for row in rows:
            token = int(tokens[row])
            produced += 1
            if token in eos:
                finish(row, "eos", streams[row].finish())
                continue
            delta = streams[row].push(token)
            if streams[row].stopped:
                finish(row, "stop", delta)
            elif len(streams[row].ids) >= max_new_tokens:
                finish(row, "length", delta + streams[row].finish())
            elif delta and stream_callback:
                stream_callback(int(row), delta)
        still = np.array([reason is None for reason in reasons])
        if not still.any():
            break
        input_ids[:, 0] = np.where(still, tokens, filler)
        logits = decoder.step(input_ids, positions[:, None])
        positions[still] += 1
        steps += 1
    decode_s = time.perf_counter() - start
    rows_out = [RowOutput(s.text, s.ids, reasons[r] or "length", len(prompt_ids[r])) for r, s in enumerate(streams)]
    return GenerationResult(rows_out, Timing(prefill_s, decode_s, produced, steps))


def prefill_rows(decoder: Decoder, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Reset ``decoder`` to one row per prompt and prefill each alone; the rows' next-token logits ``[B, V]``."""
    decoder.reset(len(prompt_ids))
    logits = np.empty((len(prompt_ids), decoder.config.vocab_size), np.float32)
    for row, ids in enumerate(prompt_ids):
        row_ids = np.asarray(ids, np.int64)[None]
        logits[row] = decoder.prefill_row(row, row_ids, np.arange(row_ids.shape[1], dtype=np.int64)[None])[0]
    return logits


def check_text(text: str, what: str) -> None:
    """GenerationError when ``text`` cannot be encoded as UTF-8 (lone surrogates: non-UTF-8 bytes from argv)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise GenerationError(f"{what} is not valid UTF-8 text ({byte} at character {err.start}); pass UTF-8 "
                              "text") from None


def check_prompts(prompt_ids: Sequence[Sequence[int]], config: RuntimeConfig, max_new_tokens: int) -> None:
    """Raise GenerationError for what the graphs cannot serve, before anything runs."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids:
        raise GenerationError("no prompts given")
    for index, ids in enumerate(prompt_ids):
        which = _which(index, len(prompt_ids))
        if len(ids) == 0:
            raise GenerationError(f"{which} encodes to no tokens; give a non-empty prompt")
        bad = [(pos, int(t)) for pos, t in enumerate(ids) if not 0 <= int(t) < config.vocab_size]
        if bad:
            pos, token = bad[0]
            raise GenerationError(f"{which} has token id {token} at position {pos}, outside the model's "
                                  f"vocabulary [0, {config.vocab_size}); the tokenizer does not match the model")
        needed = len(ids) + max_new_tokens
        if config.max_position is not None and needed > config.max_position:
            raise GenerationError(f"{which} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} it "
                                  f"needs {needed} positions, beyond the model's max_position {config.max_position}; "
                                  "shorten the prompt or lower max_new_tokens")


def _which(index: int, count: int) -> str:
    return "the prompt" if count == 1 else f"prompt {index}"


def _check_finite(logits: np.ndarray, rows: np.ndarray, step: int) -> None:
    if not np.isfinite(logits[rows]).all():
        bad = [int(r) for r in rows if not np.isfinite(logits[r]).all()]
        raise NonFiniteLogitsError(f"logits of rows {bad} contain NaN or inf at decode step {step}; "
                                   "the graph overflowed (try the fp32 bundle)")


class _RowStream:
    """Incremental detokenisation of one row, with stop strings held back until they cannot match.

    Text is released only when the newly decoded piece does not end in U+FFFD, so a multi-byte
    character split across byte-level BPE tokens is released whole (the offsets scheme of
    text-generation-inference: decode only a short window, not the whole row, per token).
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], incremental: bool = True):
        self.tokenizer = tokenizer
        self.stops = list(stop_strings)
        self.incremental = incremental
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0           # ids[_prefix:_read] decode to text already in self.text
        self._read = 0
        self._emitted = 0          # chars of self.text handed out

    def push(self, token: int) -> str:
        """Add one token; return the text that can be released now."""
        self.ids.append(token)
        if not self.incremental:
            return ""
        piece = self._decode_pending()
        if piece and not piece.endswith("\ufffd"):
            self.text += piece
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is pending (even an incomplete character) and end the row."""
        if self._read < len(self.ids):
            self.text += self._decode_pending()
            self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _decode_pending(self) -> str:
        done = self.tokenizer.decode(self.ids[self._prefix:self._read])
        full = self.tokenizer.decode(self.ids[self._prefix:])
        return full[len(done):] if len(full) > len(done) else ""

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (self.text.find(s, self._emitted) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped, final = self.text[:cut], True, True
        end = len(self.text) if final else len(self.text) - self._holdback()
        delta = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def _holdback(self) -> int:
        """Length of the longest unreleased suffix that could still grow into a stop string."""
        pending = len(self.text) - self._emitted
        for size in range(min(pending, max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0


# the other decode loops (runtime/resume.py, the server's engine) share these
RowStream = _RowStream
check_finite = _check_finite
