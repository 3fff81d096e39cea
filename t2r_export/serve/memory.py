"""Where a served stream's memory goes: the serve engine alone (no HTTP), stage by stage.

    t2r-export serve-load BUNDLE --engine-only [--streams 64] [--prefill-batch 8] [--prefill-arena keep]

Runs :class:`Engine` in this process with a stand-in for the event loop, first one request, then
``streams`` concurrent greedy requests (each replaced as it finishes, until ``4 * streams`` are
done), and prints the RSS after each stage and the growth per extra stream, next to the sizes
the engine holds by design: its state once per state set the decoder keeps (one where the graphs
update it in place, two otherwise) and a logits row per stream. Then the decoder alone, as the
engine opens it, steps 1, 2, ... ``streams`` rows in a fresh process: what that adds per row is
the decoder's own share, and the rest of the engine's figure is the requests, their prefill rounds
and the heap they leave. ONNX Runtime's arena and the C heap grow in steps of up to a megabyte or
so, so these per-row figures are sharp over many streams (64: within 1% of the design on the
bundled model) and swing by tens of KB over a few. What ``serve-load`` measures beyond these
figures is the HTTP side (uvicorn, asyncio, the per-request objects). Torch-free.
"""

from __future__ import annotations

import threading
import time

import psutil

from .. import contract
from ..bench.child import ChildProcessFailed, run_in_child
from ..runtime import SamplingParams, load_bundle
from ..runtime.in_place import resident_row_nbytes
from .engine import Engine, Request
from .load import load_prompts


class _Sink:
    """Stands in for an asyncio loop and queue: events are handled on the decode thread."""

    def __init__(self, on_done):
        self.on_done = on_done

    def call_soon_threadsafe(self, function, *args):
        function(*args)

    def put_nowait(self, event):
        if event[0] in ("done", "error"):
            self.on_done(event)


def measure(bundle, streams: int = 64, max_tokens: int = 64, prefill_batch: int = 8,
            prefill_arena: str = "keep", prefill_tokens: int = 512) -> list[tuple[str, float]]:
    """[(stage, RSS bytes)] of this process serving ``streams`` concurrent requests."""
    proc = psutil.Process()
    marks = [("bundle loaded", proc.memory_info().rss)]
    loaded = load_bundle(bundle)
    engine = Engine(loaded, max_batch=streams, threads=1, prefix_cache_bytes=0, prefill_batch=prefill_batch,
                    prefill_arena=prefill_arena, prefill_tokens=prefill_tokens)
    engine.start()
    marks.append((f"engine started (working memory taken: batch {streams}, {engine.prefill_tokens}-token prefills)",
                  proc.memory_info().rss))
    tokenizer = loaded.load_tokenizer()
    prompts = [tokenizer.encode(p).ids for p in load_prompts(4 * streams)]
    done = threading.Semaphore(0)
    sink = _Sink(lambda event: done.release())

    def submit(ids):
        engine.submit(Request(ids, max_tokens, SamplingParams(temperature=0.0, seed=0), [], sink, sink,
                              incremental=False))

    try:
        submit(prompts[0])
        done.acquire()
        marks.append(("after one stream", proc.memory_info().rss))
        peak, sent, start = proc.memory_info().rss, 0, time.perf_counter()
        for ids in prompts[:streams]:
            submit(ids)
            sent += 1
        finished = 0
        while finished < len(prompts):
            while not done.acquire(timeout=0.02):
                peak = max(peak, proc.memory_info().rss)
            finished += 1
            if sent < len(prompts):
                submit(prompts[sent])
                sent += 1
        wall = time.perf_counter() - start
        peak = max(peak, proc.memory_info().rss)
        marks.append((f"peak, {streams} concurrent streams ({len(prompts)} requests, "
                       f"{engine.tokens_total - max_tokens} tokens in {wall:.2f} s)", peak))
    finally:
        engine.stop()
    return marks


def decoder_rows(bundle, streams: int) -> float:
    """RSS bytes per row that stepping 1, 2, ... ``streams`` rows adds to a decoder opened as the engine
    opens it (its step bindings and the largest step's working memory taken up front), after one
    step of one row."""
    import gc

    import numpy as np

    from ..runtime import OrtDecoder

    proc = psutil.Process()
    with OrtDecoder(load_bundle(bundle), threads=1, memory_pattern=False) as decoder:
        decoder.reset(streams)
        decoder.prepare_steps()
        ids = np.zeros((streams, 1), np.int64)
        decoder.step_rows(1, ids[:1], ids[:1])
        gc.collect()
        before = proc.memory_info().rss
        for rows in range(2, streams + 1):
            decoder.step_rows(rows, ids[:rows], ids[:rows])
        gc.collect()
        return (proc.memory_info().rss - before) / (streams - 1)


def report(bundle, streams: int = 64, max_tokens: int = 64, prefill_batch: int = 8,
           prefill_arena: str = "keep", prefill_tokens: int = 512) -> list[str]:
    """The lines ``serve-load --engine-only`` prints."""
    marks = measure(bundle, streams, max_tokens, prefill_batch, prefill_arena, prefill_tokens)
    loaded = load_bundle(bundle)
    config = loaded.config
    state = contract.state_nbytes(config.state_shape, 1, config.state_dtype)
    sets = 1 if loaded.updates_in_place else 2
    lines = [f"{name:>64}: {rss / 1e6:7.1f} MB" for name, rss in marks]
    growth = (marks[-1][1] - marks[-2][1]) / (streams - 1)
    lines.append(f"{'growth per extra stream (peak - one stream) / (streams - 1)':>64}: {growth / 1e3:7.1f} KB")
    label = f"by design: {sets} state set{'s' if sets > 1 else ''} + a logits row"
    lines.append(f"{label:>64}: "
                 f"{resident_row_nbytes(config, sets == 1) / 1e3:7.1f} "
                 f"KB (one state {state / 1e3:.1f} KB)")
    # in a fresh process: in this one the engine's freed memory would serve the decoder's rows
    label = f"the decoder alone, stepping 1..{streams} rows, per extra row"
    try:
        rows = run_in_child(decoder_rows, str(bundle), streams, what="decoder rows")
    except ChildProcessFailed as err:
        lines.append(f"{label:>64}: not measured ({err})")
    else:
        lines.append(f"{label:>64}: {rows / 1e3:7.1f} KB")
    return lines
