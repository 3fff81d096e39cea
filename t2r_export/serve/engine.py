"""The decode loop behind `t2r-export serve`: continuous batching over independent state rows.

Two threads share one OrtDecoder's sessions. The prefill thread takes waiting requests, orders
them by prompt length and prefills them (equal lengths in one graph call, through the prefix
cache) into a side decoder's rows; the decode thread moves those rows into its batch at the next
step, as far as its free rows go, and steps all active rows. So new prompts are prefilled on the
second core while the running streams keep decoding, instead of every stream stalling while the
newcomers' prompts go through the graph; and a round is prefilled while the batch is still full,
so its requests join at the very step rows free up. The prefill thread runs a few nice steps below
the rest (``PREFILL_NICE``), so where the two contend for a core the running streams' step wins.

Active rows are kept packed at the front of the state buffers, so each step runs the step graph
over exactly the active rows (``OrtDecoder.step_rows``); a request leaves when it finishes or its
client goes away, at any step, and the rows after it move down one slot (a state copy, about
100 KB for the bundled model). A request with ``n`` choices is prefilled once and its row forked
into n rows. Rows are independent in the graphs and each choice samples from its own generator,
seeded by its request's ``seed`` (choice i: ``seed + i``), so an output does not depend on which
requests share its batch (up to the batched-vs-single-row tolerance of t2r_export/tolerances.py).

Events go back to the asyncio side as ("text", delta, choice) while decoding, then ("done",
finish_reason, usage, choice) or ("error", status, message, choice): collected over one step and
handed over with one ``loop.call_soon_threadsafe`` per step (a per-token call would wake the
event loop 64 times a step).
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
from ..runtime.prefix_cache import PrefixCache, prefill_cached, prefill_many
from ..runtime.sampling import SamplingParams, argmax_rows, sample_row
from ..runtime.state import bundle_identity
from .priority import lower_this_thread, resolve_prefill_nice

# the server process's GIL switch interval (Python's default: 5 ms). The decode thread needs the
# GIL only between steps, to sample and hand out its rows' tokens; with the default it can wait up
# to 5 ms for the event loop's thread to let go, a third of a 64-row step on the bundled model
GIL_SWITCH_S = 0.0005


def decode_core_plan(threads: int) -> tuple[int, set[int]]:
    """(the core the decode thread keeps to itself, the cores left to the server's other threads):
    the last core this process may run on, and the rest. With one ONNX Runtime thread the step runs
    on the decode thread alone, so on that core nothing else (the event loop, the prefill thread, a
    client on the same machine) takes turns with it. ValueError (one line) where that cannot be done."""
    if threads != 1:
        raise ValueError(f"--pin-decode needs --threads 1 (the step then runs on the decode thread alone), got "
                         f"--threads {threads}")
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--pin-decode needs per-thread CPU affinity (Linux), which this platform does not have")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise ValueError(f"--pin-decode needs at least 2 cores to split; this process may run on {len(cpus)}")
    return cpus[-1], set(cpus[:-1])


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
    # the choices of one request share its prompt, queue and cancellation; choice i samples with seed + i
    n: int = 1
    cancelled: bool = False
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


@dataclass
class Choice:
    """One decoded row: a request's choice ``index``."""

    request: Request
    index: int
    # its generator's seed; the generator itself (about 2 KB) is made at the first sampled token,
    # so greedy rows never hold one
    seed: int
    stream: RowStream
    logits: np.ndarray
    position: int
    token: int = -1
    reason: str | None = None
    # its logits' greedy pick and whether they are all finite, taken when the logits arrive
    best: int = -1
    finite: bool = True
    _rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def see(self, logits: np.ndarray, best: int, finite: bool) -> None:
        self.logits, self.best, self.finite = logits, best, finite

    @property
    def done(self) -> bool:
        return self.reason is not None or self.request.cancelled


class EngineFull(Exception):
    """More requests are waiting than the engine accepts."""


class Engine:
    """Continuous batching over one OrtDecoder; ``submit`` from any thread, the loops run in their own."""

    def __init__(self, bundle, max_batch: int = 64, threads: int = 0, provider: str = "cpu",
                 prefix_cache_bytes: int = 64 << 20, max_waiting: int = 1024, prefill_batch: int = 8,
                 prefill_arena: str = "keep", prefill_tokens: int = 512, decode_cpu: int | None = None,
                 prefill_nice: int | None = None):
        if max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
        if prefill_batch < 1:
            raise ValueError(f"--prefill-batch must be >= 1, got {prefill_batch}")
        if prefill_tokens < 1:
            raise ValueError(f"--prefill-tokens must be >= 1, got {prefill_tokens}")
        # nice steps the prefill thread runs below the rest of the server (PREFILL_NICE by default)
        self.prefill_nice = resolve_prefill_nice(prefill_nice)
        self.bundle = bundle
        self.config = bundle.config
        # the core the decode thread pins itself to (decode_core_plan), or None: wherever the OS puts it
        self.decode_cpu = decode_cpu
        self.tokenizer = bundle.load_tokenizer()
        self.identity = bundle_identity(bundle)
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        # the step runs every row count from 1 to max_batch: no memory pattern per shape (see reserve)
        self.decoder = OrtDecoder(bundle, provider=provider, threads=threads, prefill_arena=prefill_arena,
                                  memory_pattern=False)
        self.decoder.reset(max_batch)
        # the prefill thread's rows: the same sessions, state buffers of their own, one row per request
        # of a round (a round's prefill memory is bounded by it, not by the streams)
        self.prefill_batch = min(prefill_batch, max_batch)
        self.prefill_tokens = prefill_tokens
        self.staging = self.decoder.side_decoder(self.prefill_batch)
        self.reserve()
        self.cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.eos = set(self.config.eos_token_ids)
        self._waiting: deque[Request] = deque()
        # prefilled requests with their staging rows and logits, for the decode thread to take
        self._ready: list[tuple[Request, int, np.ndarray]] = []
        self._active: list[Choice] = []
        self._wake = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self.requests_total = 0
        self.tokens_total = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._outbox: list[tuple[Request, tuple]] = []
        self.started = time.time()

    def reserve(self) -> None:
        """Take the working memory the largest step and the largest prefill call need, now.

        ONNX Runtime's arena keeps the blocks it has needed, so without this a server's RSS climbs
        with the first busy minutes, by more than the streams' states; with it, what serving adds
        per stream is that stream's state and logits row (docs/design.md#serving-memory). The step's
        share is taken by ``OrtDecoder.prepare_steps`` (its IO bindings for every count of active
        rows, and one step over ``max_batch`` rows of a throwaway state: the streams' own rows stay
        unwritten until used); the staging rows, which every prefill round writes anyway, take one
        prefill of ``prefill_tokens`` tokens, the most any later prefill call takes.
        """
        self.decoder.prepare_steps()
        rows = min(self.prefill_batch, self.prefill_tokens)
        length = max(1, self.prefill_tokens // rows)
        if self.config.max_position is not None:
            # no call is longer than the model's positions (prompts are refused before that)
            length = min(length, self.config.max_position)
        ids = np.zeros((rows, length), np.int64)
        self.staging.prefill_rows(0, ids, np.tile(np.arange(length, dtype=np.int64), (rows, 1)))
        self.staging.reset(self.prefill_batch)

    # ---- the asyncio side -------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._decode_loop, "t2r-decode"), (self._prefill_loop, "t2r-prefill")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        for request in [*self._waiting, *(r for r, _, _ in self._ready), *{id(c.request): c.request
                                                                           for c in self._active}.values()]:
            request.deliver(("error", 503, "the server is shutting down", 0))
        self.staging.close()
        self.decoder.close()

    def submit(self, request: Request) -> None:
        if not 1 <= request.n <= self.max_batch:
            raise ValueError(f"n = {request.n} is outside [1, {self.max_batch}] (the server's --max-batch)")
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(request)
            self.requests_total += 1
            self._wake.notify_all()

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
                "prefill_nice": self.prefill_nice,
                "prefix_cache": None if cache is None else {
                    "entries": len(cache), "bytes": cache.nbytes, "max_bytes": cache.max_bytes,
                    "hits": cache.hits, "misses": cache.misses}}

    # ---- the prefill thread -----------------------------------------------------------------------

    def _prefill_loop(self) -> None:
        if self.prefill_nice:
            lower_this_thread(self.prefill_nice)
        while True:
            with self._wake:
                # one round of staging rows at a time: wait until the decode thread took the last one.
                # A round does not wait for free decode rows: it is prefilled while the batch is full,
                # so its requests join at the step their rows free up
                while not self._stop and (self._ready or not self._waiting):
                    self._wake.wait()
                if self._stop:
                    return
                joining = []
                while self._waiting and len(joining) < self.prefill_batch:
                    request = self._waiting.popleft()
                    if not request.cancelled:
                        joining.append(request)
            ready = self._prefill(joining)
            with self._wake:
                self._ready = ready
                self._wake.notify_all()

    def _prefill(self, joining: list[Request]) -> list[tuple[Request, int, np.ndarray]]:
        """Prefill into staging rows 0, 1, ...: equal lengths together; a bad prompt fails alone."""
        # equal first segments next to each other, so prefill_many groups them
        joining.sort(key=lambda r: min([*r.cache_points, len(r.prompt_ids)]))
        try:
            results = prefill_many(self.staging, 0, [r.prompt_ids for r in joining], self.cache, self.identity,
                                   [r.cache_points for r in joining], self.prefill_tokens)
            return [(request, row, logits) for row, (request, (logits, _)) in enumerate(zip(joining, results))]
        except ValueError:
            pass
        except Exception as err:  # a failing graph must not kill the server: fail these requests, go on
            for request in joining:
                request.deliver(("error", 500, f"the decoder failed: {_first_line(err)}", 0))
            return []
        ready = []
        for request in joining:
            try:
                logits, _ = prefill_cached(self.staging, len(ready), request.prompt_ids, self.cache, self.identity,
                                           request.cache_points, self.prefill_tokens)
            except Exception as err:
                status = 400 if isinstance(err, ValueError) else 500
                request.deliver(("error", status, _first_line(err), 0))
                continue
            ready.append((request, len(ready), logits))
        return ready

    # ---- the decode thread ------------------------------------------------------------------------

    def _decode_loop(self) -> None:
        if self.decode_cpu is not None:
            os.sched_setaffinity(0, {self.decode_cpu})
        while True:
            with self._wake:
                while not self._stop and not self._ready and not self._active:
                    self._wake.wait()
                if self._stop:
                    return
                joining = self._ready
            # on a failure below, the round's requests are dropped with the batch
            taken = len(joining)
            try:
                try:
                    taken = self._take(joining)
                finally:
                    # the staging rows are free again once every request of the round has been copied
                    if taken:
                        with self._wake:
                            self._ready = joining[taken:]
                            if not self._ready:
                                self._wake.notify_all()
                # _iteration hands its events over itself, before the step graph runs
                self._iteration()
            except Exception as err:  # a failing graph must not kill the server: fail the batch, go on
                self._flush()
                for choice in self._active:
                    if choice.reason is None:
                        choice.reason = "error"
                        choice.request.deliver(("error", 500, f"the decoder failed: {_first_line(err)}",
                                                choice.index))
                self._active = []

    def _take(self, joining: list[tuple[Request, int, np.ndarray]]) -> int:
        """Prefilled requests join the batch in order, as far as its free rows go: their staging row
        forked into one row per choice. Returns how many of ``joining`` were taken (or dropped, cancelled)."""
        taken = 0
        for request, row, logits in joining:
            if request.cancelled:
                taken += 1
                continue
            if len(self._active) + request.n > self.max_batch:
                break
            # the prompt's last logits, shared by every choice of the request
            first, best, finite = logits[0], int(argmax_rows(logits[0])), bool(np.isfinite(logits[0]).all())
            for index in range(request.n):
                self.decoder.take_row(self.staging, row, len(self._active))
                seed = (request.sampling.seed + index) % (1 << 63)
                stream = RowStream(self.tokenizer, request.stops, request.incremental or bool(request.stops))
                self._active.append(Choice(request, index, seed, stream, first, len(request.prompt_ids),
                                           best=best, finite=finite))
            taken += 1
        return taken

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

    def _iteration(self) -> None:
        if not self._active:
            return
        produced = 0
        for choice in self._active:
            if choice.request.cancelled:
                continue
            produced += 1
            self._advance(choice)
        self._note(produced)
        self._compact()
        # the event loop turns this step's tokens into responses while the graph runs (the step
        # releases the GIL), not when the decode thread next needs the GIL for its own rows
        self._flush()
        if not self._active:
            return
        ids = np.array([[c.token] for c in self._active], np.int64)
        positions = np.array([[c.position] for c in self._active], np.int64)
        logits = self.decoder.step_rows(len(self._active), ids, positions)
        # NaN/inf checks and greedy picks of every row as reductions over the step's own logits block
        # (calls per row, or a stacked copy of the rows, cost the decode thread time and memory)
        finite = (np.isfinite(logits.max(axis=1)) & np.isfinite(logits.min(axis=1))).tolist()
        best = argmax_rows(logits).tolist()
        for row, choice in enumerate(self._active):
            choice.see(logits[row], best[row], finite[row])
            choice.position += 1

    def _advance(self, choice: Choice) -> None:
        """Sample the choice's next token (greedy: its logits' argmax), send its text, decide
        whether it finished; logits with NaN or inf end it with an error."""
        request = choice.request
        best = choice.best
        if not choice.finite:
            choice.reason = "error"
            self._outbox.append((request, ("error", 500, "the model produced NaN or inf logits", choice.index)))
            return
        token = best if request.sampling.greedy else sample_row(choice.logits, request.sampling, choice.rng)
        stream = choice.stream
        if token in self.eos:
            choice.reason, delta = "eos", stream.finish()
        else:
            delta = stream.push(token)
            if stream.stopped:
                choice.reason = "stop"
            elif len(stream.ids) >= request.max_tokens:
                choice.reason, delta = "length", delta + stream.finish()
        choice.token = token
        if delta:
            self._outbox.append((request, ("text", delta, choice.index)))
        if choice.reason is not None:
            completion = len(stream.ids) + (choice.reason == "eos")
            self._outbox.append((request, ("done", choice.reason, completion, choice.index)))

    def _compact(self) -> None:
        """Drop finished and cancelled rows; the others move down, keeping their order."""
        kept = []
        for row, choice in enumerate(self._active):
            if choice.done:
                continue
            if row != len(kept):
                self.decoder.copy_row(row, len(kept))
            kept.append(choice)
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


def _first_line(err: Exception) -> str:
    return (str(err).strip() or type(err).__name__).splitlines()[0][:300]


def default_seed() -> int:
    """A seed for a request that names none (its output is then not reproducible, as with OpenAI)."""
    return int.from_bytes(os.urandom(8), "little") >> 1
