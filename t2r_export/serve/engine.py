"""The decode loop behind `t2r-export serve`: one thread owns the decoder and batches continuously.

Every request gets a row of a decoder with capacity ``max_batch``. Active rows are kept packed at
the front of the state buffers, so each step runs the step graph over exactly the active rows
(``OrtDecoder.step_rows``): a request joins by prefilling its row (through the prefix cache) and
leaves when it finishes or its client goes away, at any step; the rows after it move down one
slot (a state copy, about 100 KB for the bundled model). Rows are independent in the graphs and each
request samples from its own generator seeded by its ``seed``, so a request's output does not
depend on which requests share its batch (up to the batched-vs-single-row tolerance of
t2r_export/tolerances.py).

Events go back to the asyncio side as ("text", delta) while decoding, then ("done", finish_reason,
usage) or ("error", status, message): collected over one step and handed over with one
``loop.call_soon_threadsafe`` per step (a per-token call would wake the event loop 64 times a step).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..runtime import OrtDecoder
from ..runtime.generate import RowStream
from ..runtime.prefix_cache import PrefixCache, prefill_cached
from ..runtime.sampling import SamplingParams, sample_row
from ..runtime.state import bundle_identity


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    # events go to ``queue.put_nowait`` on ``loop`` (an asyncio loop), batched once per step
    loop: object
    queue: object
    cache_points: tuple[int, ...] = ()
    # False: no text until the end (no stop strings, not streamed), so no per-token detokenising
    incremental: bool = True
    cancelled: bool = False
    # decode-loop side
    stream: RowStream | None = None
    rng: np.random.Generator | None = None
    logits: np.ndarray | None = None
    position: int = 0
    token: int = -1
    reason: str | None = None
    reused: int = 0
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True

    def deliver(self, event: tuple) -> None:
        """Send one event now (outside the decode loop's batching)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            # its event loop has closed: nobody is waiting for it
            pass


class EngineFull(Exception):
    """More requests are waiting than the engine accepts."""


class Engine:
    """Continuous batching over one OrtDecoder; ``submit`` from any thread, the loop runs in its own."""

    def __init__(self, bundle, max_batch: int = 64, threads: int = 0, provider: str = "cpu",
                 prefix_cache_bytes: int = 64 << 20, max_waiting: int = 1024):
        if max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
        self.bundle = bundle
        self.config = bundle.config
        self.tokenizer = bundle.load_tokenizer()
        self.identity = bundle_identity(bundle)
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.decoder = OrtDecoder(bundle, provider=provider, threads=threads)
        self.decoder.reset(max_batch)
        self.cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.eos = set(self.config.eos_token_ids)
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.requests_total = 0
        self.tokens_total = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._outbox: list[tuple[Request, tuple]] = []
        self.started = time.time()

    # ---- the asyncio side -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="t2r-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.decoder.close()

    def submit(self, request: Request) -> None:
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} requests are already waiting; retry later")
            request.rng = np.random.default_rng(request.sampling.seed)
            self._waiting.append(request)
            self.requests_total += 1
            self._wake.notify()

    def metrics(self) -> dict:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= 10.0]
        span = (now - recent[0][0]) if len(recent) > 1 else 0.0
        rate = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        cache = self.cache
        return {"active_streams": len(self._active), "waiting": len(self._waiting), "max_batch": self.max_batch,
                "requests_total": self.requests_total, "tokens_total": self.tokens_total,
                "tokens_per_s": round(rate, 1), "uptime_s": round(time.time() - self.started, 1),
                "state_bytes_per_stream": self.decoder.state_nbytes() // self.max_batch,
                "prefix_cache": None if cache is None else {
                    "entries": len(cache), "bytes": cache.nbytes, "max_bytes": cache.max_bytes,
                    "hits": cache.hits, "misses": cache.misses}}

    # ---- the decode thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stop:
                    break
                joining = []
                while self._waiting and len(self._active) + len(joining) < self.max_batch:
                    joining.append(self._waiting.popleft())
            try:
                self._iteration(joining)
                self._flush()
            except Exception as err:  # a failing graph must not kill the server: fail the batch, go on
                self._flush()
                message = (str(err).strip() or type(err).__name__).splitlines()[0][:300]
                for request in [*self._active, *joining]:
                    if request.reason is None:
                        request.reason = "error"
                        request.deliver(("error", 500, f"the decoder failed: {message}"))
                self._active = []
        for request in [*self._active, *self._waiting]:
            request.deliver(("error", 503, "the server is shutting down"))

    def _flush(self) -> None:
        """Hand this step's events to their event loops, one wake-up per loop."""
        by_loop: dict[int, tuple[object, list]] = {}
        for request, event in self._outbox:
            by_loop.setdefault(id(request.loop), (request.loop, []))[1].append((request.queue, event))
        self._outbox = []
        for loop, items in by_loop.values():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:
                # that loop has closed (its server stopped): nobody is waiting for these events
                pass

    def _iteration(self, joining: list[Request]) -> None:
        for request in joining:
            if request.cancelled:
                continue
            row = len(self._active)
            try:
                logits, request.reused = prefill_cached(self.decoder, row, request.prompt_ids, self.cache,
                                                        self.identity, request.cache_points)
            except ValueError as err:
                # one bad prompt fails alone; the rows already decoding go on
                request.reason = "error"
                request.deliver(("error", 400, str(err).splitlines()[0][:300]))
                continue
            request.logits = logits[0]
            request.position = len(request.prompt_ids)
            request.stream = RowStream(self.tokenizer, request.stops, request.incremental or bool(request.stops))
            self._active.append(request)
        if not self._active:
            return
        produced = 0
        for request in self._active:
            if request.cancelled:
                continue
            produced += 1
            self._advance(request)
        self._note(produced)
        self._compact()
        if not self._active:
            return
        ids = np.array([[r.token] for r in self._active], np.int64)
        positions = np.array([[r.position] for r in self._active], np.int64)
        logits = self.decoder.step_rows(len(self._active), ids, positions)
        for row, request in enumerate(self._active):
            request.logits = logits[row]
            request.position += 1

    def _advance(self, request: Request) -> None:
        """Sample the request's next token, send its text, decide whether it finished."""
        if not np.isfinite(request.logits).all():
            request.reason = "error"
            request.deliver(("error", 500, "the model produced NaN or inf logits"))
            return
        token = sample_row(request.logits, request.sampling, request.rng)
        stream = request.stream
        if token in self.eos:
            request.reason, delta = "eos", stream.finish()
        else:
            delta = stream.push(token)
            if stream.stopped:
                request.reason = "stop"
            elif len(stream.ids) >= request.max_tokens:
                request.reason, delta = "length", delta + stream.finish()
        request.token = token
        if delta:
            self._outbox.append((request, ("text", delta)))
        if request.reason is not None:
            completion = len(stream.ids) + (request.reason == "eos")
            usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": completion,
                     "total_tokens": len(request.prompt_ids) + completion}
            self._outbox.append((request, ("done", request.reason, usage)))

    def _compact(self) -> None:
        """Drop finished and cancelled rows; the others move down, keeping their order."""
        kept = []
        for row, request in enumerate(self._active):
            if request.reason is not None or request.cancelled:
                continue
            if row != len(kept):
                self.decoder.copy_row(row, len(kept))
            kept.append(request)
        self._active = kept

    def _note(self, produced: int) -> None:
        now = time.perf_counter()
        self.tokens_total += produced
        self._recent.append((now, produced))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()


def _dispatch(items) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def default_seed() -> int:
    """A seed for a request that names none (its output is then not reproducible, as with OpenAI)."""
    return int.from_bytes(os.urandom(8), "little") >> 1
