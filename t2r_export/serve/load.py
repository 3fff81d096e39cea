"""`t2r-export serve-load`: start `serve` as a child process on a free 127.0.0.1 port and load it.

In one run: the runtime's own batched decode at batch ``streams`` (``generate_ids``, the same
prompts and sampling, decode time only) as the baseline, run before the server and again after
it (the ratio is to their mean: a shared machine's speed drifts within a minute); each prompt
decoded alone by the runtime (what every served answer must equal); then the server, first one
request alone (its RSS is the one-stream figure), then ``requests`` requests at ``streams``
concurrency from a client in a process of its own, on uvloop where installed: the async openai
client, or (``client="aiohttp"``) plain aiohttp reading the JSON body or the server-sent events
itself, a lighter load generator for a machine whose cores the client shares with the server
(openai's client builds typed objects for every streamed chunk). Reported: requests/s, aggregate
tokens/s (completion tokens over the whole wall time, prefill and HTTP included) and its ratio to
the baseline, p50/p99 latency, the server's RSS idle, after one stream, at its peak under load and
after, the growth per extra stream, and requests lost (no answer) or mixed up (an answer that is
not its prompt's solo answer).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .local import free_port


# the load generators serve-load can run
CLIENTS = ("openai", "aiohttp")


class LoadError(RuntimeError):
    """The server could not be started or answered nothing."""


@dataclass
class LoadReport:
    streams: int
    requests: int
    max_tokens: int
    stream: bool
    wall_s: float
    completion_tokens: int
    requests_per_s: float
    tokens_per_s: float
    # the runtime's batched decode: the mean of one run before the server's and one after
    baseline_tokens_per_s: float
    ratio: float
    baseline_before_tokens_per_s: float
    baseline_after_tokens_per_s: float
    # the same while ``streams`` requests stayed outstanding (after the first wave, before the drain; None: no
    # such stretch)
    full_concurrency_tokens_per_s: float | None
    full_concurrency_ratio: float | None
    baseline_with_prefill_tokens_per_s: float
    ratio_with_prefill: float
    packed_step_ms: float
    full_step_ms: float
    p50_latency_s: float
    p99_latency_s: float
    # streamed runs: time from sending a request to its first text (None for whole responses)
    first_text_p50_s: float | None
    first_text_p99_s: float | None
    rss_idle_mb: float
    rss_one_stream_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    rss_per_extra_stream_kb: float
    state_bytes_per_stream: int
    server_cpu_s: float
    client_cpu_s: float
    baseline_tokens_per_cpu_s: float
    lost: int
    mixed: int
    prefill_batch: int = 8
    stream_interval_ms: float = 0.0
    client: str = "openai"
    pin_decode: bool = False
    # the nice steps the server's prefill thread ran below the rest (its /metrics)
    prefill_nice: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def print(self, console) -> None:
        rows = [
            ("requests", f"{self.requests} at {self.streams} concurrent ({'streamed' if self.stream else 'whole'}), "
                         f"max_tokens {self.max_tokens}, --prefill-batch {self.prefill_batch}, "
                         f"{self.client} client" + (", --pin-decode" if self.pin_decode else "")
                         + f", --prefill-nice {self.prefill_nice}"
                         + (f", --stream-interval-ms {self.stream_interval_ms:g}" if self.stream else "")),
            ("wall time", f"{self.wall_s:.2f} s"),
            ("requests/s", f"{self.requests_per_s:.2f}"),
            ("tokens/s (aggregate)", f"{self.tokens_per_s:.1f} ({self.completion_tokens} completion tokens)"),
            (f"runtime batched decode, batch {self.streams}",
             f"{self.baseline_tokens_per_s:.1f} tokens/s (decode only; the mean of "
             f"{self.baseline_before_tokens_per_s:.1f} before the server's run and "
             f"{self.baseline_after_tokens_per_s:.1f} after)"),
            ("ratio", f"{self.ratio:.2f} (goal >= 0.80)"),
            (f"while all {self.streams} were in flight",
             "— (too few requests for a stretch between the first wave and the drain)"
             if self.full_concurrency_ratio is None else
             f"{self.full_concurrency_tokens_per_s:.1f} tokens/s, ratio {self.full_concurrency_ratio:.2f} (the answers "
             f"after the first wave's and until the last request went out)"),
            ("the same with its prompts' prefill", f"{self.baseline_with_prefill_tokens_per_s:.1f} tokens/s, ratio "
                                                   f"{self.ratio_with_prefill:.2f}"),
            (f"step of {max(1, self.streams // 8)} active rows of {self.streams}",
             f"{self.packed_step_ms:.2f} ms packed (step_rows) vs {self.full_step_ms:.2f} ms full batch"),
            ("latency p50 / p99", f"{self.p50_latency_s:.3f} s / {self.p99_latency_s:.3f} s"),
            ("time to first text p50 / p99", "— (whole responses)" if self.first_text_p50_s is None else
             f"{self.first_text_p50_s:.3f} s / {self.first_text_p99_s:.3f} s"),
            ("server RSS idle / 1 stream / peak / after",
             f"{self.rss_idle_mb:.1f} / {self.rss_one_stream_mb:.1f} / {self.rss_peak_mb:.1f} / "
             f"{self.rss_after_mb:.1f} MB"),
            ("RSS growth per extra stream", f"{self.rss_per_extra_stream_kb:.1f} KB (one state: "
                                            f"{self.state_bytes_per_stream / 1000:.1f} KB)"),
            ("CPU time server / client", f"{self.server_cpu_s:.1f} s / {self.client_cpu_s:.1f} s (wall "
                                         f"{self.wall_s:.1f} s, {psutil_cores()} cores)"),
            ("tokens per CPU-second, server / runtime",
             f"{self.completion_tokens / max(self.server_cpu_s, 1e-9):.1f} / {self.baseline_tokens_per_cpu_s:.1f} "
             "(prefill included; CPU time does not count what else runs on the machine)"),
            ("lost / mixed up", f"{self.lost} / {self.mixed}"),
        ]
        for name, value in rows:
            console.print(f"{name:>44}: {value}", highlight=False, soft_wrap=True)


def psutil_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_prompts(count: int) -> list[str]:
    """Distinct prompts, so an answer delivered to the wrong request shows."""
    return [f"# task {i}: {['sort', 'parse', 'count', 'merge'][i % 4]} the items\ndef task_{i}(items):\n"
            for i in range(count)]


def run_load_test(bundle: str | Path, streams: int = 64, requests: int = 256, max_tokens: int = 64,
                  stream: bool = True, threads: int = 0, prefill_batch: int = 8,
                  prefill_arena: str = "keep", stream_interval_ms: float = 0.0,
                  prefill_tokens: int = 512, client: str = "openai", pin_decode: bool = False,
                  prefill_nice: int | None = None) -> LoadReport:
    import psutil

    from ..runtime import OrtDecoder, SamplingParams, generate_ids, load_bundle
    from .engine import decode_core_plan

    if client not in CLIENTS:
        raise ValueError(f"unknown client {client!r}; expected one of {', '.join(CLIENTS)}")
    # the client stands in for remote callers: with --pin-decode it keeps off the server's decode core
    client_cpus = decode_core_plan(threads)[1] if pin_decode else None

    loaded = load_bundle(bundle)
    tokenizer = loaded.load_tokenizer()
    prompts = load_prompts(requests)
    ids = [tokenizer.encode(p).ids for p in prompts]
    greedy = SamplingParams(temperature=0.0)
    batch = [ids[i % len(ids)] for i in range(streams)]

    def batched_decode(decoder) -> tuple[float, float, float]:
        """(tokens/s decoding only, tokens/s with the prompts' prefill, tokens per CPU-second)"""
        generate_ids(decoder, tokenizer, batch, 4, greedy)
        cpu = time.process_time()
        timing = generate_ids(decoder, tokenizer, batch, max_tokens, greedy).timing
        cpu = time.process_time() - cpu
        return (timing.tokens_per_s, timing.decode_tokens / (timing.prefill_s + timing.decode_s),
                timing.decode_tokens / max(cpu, 1e-9))

    with OrtDecoder(loaded, threads=threads) as decoder:
        before = batched_decode(decoder)
        solo = [generate_ids(decoder, tokenizer, [row], max_tokens, greedy).rows[0].text for row in ids]
        packed_ms, full_ms = _step_costs(decoder, streams, max(1, streams // 8))
    port = free_port()
    command = [sys.executable, "-c", "from t2r_export.cli import main; main()", "serve", str(bundle),
               "--port", str(port), "--max-batch", str(streams), "--prefix-cache-mb", "0",
               "--threads", str(threads), "--model-name", "t2r", "--max-tokens", str(max_tokens),
               "--prefill-batch", str(prefill_batch), "--prefill-arena", prefill_arena,
               "--stream-interval-ms", str(stream_interval_ms), "--prefill-tokens", str(prefill_tokens),
               *(["--pin-decode"] if pin_decode else []),
               *(["--prefill-nice", str(prefill_nice)] if prefill_nice is not None else [])]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(server, base)
        proc = psutil.Process(server.pid)
        rss_idle = proc.memory_info().rss
        # the client runs in a process of its own (its CPU time is its own, it shares no GIL with the
        # RSS sampler); the one-request run also warms its imports
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_keep_to,
                                 initargs=(client_cpus,)) as pool:
            one, _, _ = pool.submit(_client, client, base, prompts[:1], 1, max_tokens, stream).result()
            rss_one = proc.memory_info().rss
            peak = _PeakRss(proc)
            peak.start()
            server_cpu = sum(proc.cpu_times()[:2])
            results, wall, client_cpu = pool.submit(_client, client, base, prompts, streams, max_tokens,
                                                    stream).result()
            server_cpu = sum(proc.cpu_times()[:2]) - server_cpu
            peak.stop()
        rss_after = proc.memory_info().rss
        metrics = json.loads(urllib.request.urlopen(f"{base}/metrics", timeout=10).read())
        state_bytes, nice = metrics["state_bytes_per_stream"], metrics["prefill_nice"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    # the baseline again once the server has gone: the machine's speed can drift within a minute, and
    # the ratio is taken to the mean of the runs on either side of the server's
    with OrtDecoder(loaded, threads=threads) as decoder:
        after = batched_decode(decoder)
    baseline, with_prefill, per_cpu = ((b + a) / 2 for b, a in zip(before, after))
    if one[0] is None:
        raise LoadError("the server answered no request")
    done = [r for r in results if r is not None]
    latencies = sorted(r[1] for r in done)
    # streamed: from sending a request to its first text (its prefill, its wait for a row, the first step)
    firsts = sorted(r[4] for r in done if r[4] is not None)
    tokens = sum(r[2] for r in done)
    mixed = sum(1 for r, want in zip(results, solo) if r is not None and r[0] != want)
    rate = tokens / wall if wall > 0 else 0.0
    full_rate = _full_concurrency_rate(done, requests, streams)
    mb = 1 << 20
    return LoadReport(
        streams=streams, requests=requests, max_tokens=max_tokens, stream=stream, wall_s=wall,
        completion_tokens=tokens, requests_per_s=len(done) / wall, tokens_per_s=rate,
        baseline_tokens_per_s=baseline, ratio=rate / baseline,
        baseline_before_tokens_per_s=before[0], baseline_after_tokens_per_s=after[0],
        full_concurrency_tokens_per_s=full_rate,
        full_concurrency_ratio=None if full_rate is None else full_rate / baseline,
        baseline_with_prefill_tokens_per_s=with_prefill, ratio_with_prefill=rate / with_prefill,
        packed_step_ms=packed_ms, full_step_ms=full_ms,
        p50_latency_s=_quantile(latencies, 0.50), p99_latency_s=_quantile(latencies, 0.99),
        first_text_p50_s=_quantile(firsts, 0.50) if firsts else None,
        first_text_p99_s=_quantile(firsts, 0.99) if firsts else None,
        rss_idle_mb=rss_idle / mb, rss_one_stream_mb=rss_one / mb, rss_peak_mb=peak.peak / mb,
        rss_after_mb=rss_after / mb,
        rss_per_extra_stream_kb=(peak.peak - rss_one) / max(1, streams - 1) / 1000,
        state_bytes_per_stream=state_bytes, server_cpu_s=server_cpu, client_cpu_s=client_cpu,
        baseline_tokens_per_cpu_s=per_cpu, lost=requests - len(done),
        mixed=mixed, prefill_batch=prefill_batch, stream_interval_ms=stream_interval_ms, client=client,
        pin_decode=pin_decode, prefill_nice=nice)


def _full_concurrency_rate(done: list, requests: int, streams: int) -> float | None:
    """Completion tokens per second in the stretch where ``streams`` requests stay outstanding:
    from the end of the first wave (the ``streams``-th answer; before it the server was taking in
    its first burst of prompts) to the last request going out (the ``requests - streams``-th
    answer; the client sends the next request as one ends, and after the last the run drains with
    fewer). The answers that end inside the stretch count, each with its tokens: the requests in
    flight at its two ends, ``streams`` each time, stand for each other. None where the run has no
    such stretch (fewer than ``2 * streams + 1`` requests)."""
    ends = sorted((r[3], r[2]) for r in done)
    first, last = streams, requests - streams
    if last <= first or len(ends) < last:
        return None
    span = ends[last - 1][0] - ends[first - 1][0]
    return sum(tokens for _, tokens in ends[first:last]) / span if span > 0 else None


def _keep_to(cpus) -> None:
    """In the client process: run on ``cpus`` only (None: anywhere)."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def _step_costs(decoder, capacity: int, active: int, repeats: int = 20) -> tuple[float, float]:
    """ms per step with ``active`` rows busy: stepping only them (packed) vs the whole ``capacity`` batch."""
    import numpy as np

    decoder.reset(capacity)
    ids, positions = np.full((capacity, 1), 5, np.int64), np.full((capacity, 1), 16, np.int64)
    costs = []
    for run in (lambda: decoder.step_rows(active, ids[:active], positions[:active]),
                lambda: decoder.step(ids, positions)):
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        costs.append((time.perf_counter() - start) / repeats * 1000)
    return costs[0], costs[1]


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _wait_healthy(server: subprocess.Popen, base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            last = (server.stderr.read() or "").strip().splitlines()
            raise LoadError(f"the server exited ({server.returncode}): {last[-1] if last else 'no message'}")
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise LoadError(f"the server did not answer {base}/health within {timeout:.0f} s")


def _event_loop() -> asyncio.AbstractEventLoop:
    """The load generator's event loop: uvloop where installed (the `serve` extra installs it for the
    server), as the server runs; it shares the server's cores, so its own CPU per chunk counts."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _client(kind: str, base: str, prompts: list[str], concurrency: int, max_tokens: int, stream: bool):
    """In the client process: (results, wall s, CPU s of this process) of firing ``prompts``."""
    fire = _fire if kind == "openai" else _fire_aiohttp
    loop = _event_loop()
    try:
        cpu, start = time.process_time(), time.perf_counter()
        results = loop.run_until_complete(fire(base, prompts, concurrency, max_tokens, stream))
        wall = time.perf_counter() - start
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    # each answer's end, from the start of the run (the fire functions note perf_counter at the end)
    results = [None if r is None else (*r[:3], r[3] - start, r[4]) for r in results]
    return results, wall, time.process_time() - cpu


async def _fire_aiohttp(base: str, prompts: list[str], concurrency: int, max_tokens: int, stream: bool):
    """As :func:`_fire`, with plain aiohttp: the JSON body, or each ``data:`` line of the event stream."""
    import aiohttp

    gate = asyncio.Semaphore(concurrency)

    async def one(http, prompt: str):
        body = {"model": "t2r", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        async with gate:
            start = time.perf_counter()
            try:
                async with http.post(f"{base}/v1/completions", json=body) as response:
                    response.raise_for_status()
                    if not stream:
                        answer = await response.json()
                        end = time.perf_counter()
                        return (answer["choices"][0]["text"], end - start, answer["usage"]["completion_tokens"], end,
                                None)
                    parts, tokens, first = [], 0, None
                    async for line in response.content:
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("choices"):
                            parts.append(chunk["choices"][0]["text"])
                            if first is None and parts[-1]:
                                first = time.perf_counter() - start
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                    end = time.perf_counter()
                    return "".join(parts), end - start, tokens, end, first
            except (aiohttp.ClientError, KeyError, ValueError):
                return None

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        return await asyncio.gather(*(one(http, p) for p in prompts))


async def _fire(base: str, prompts: list[str], concurrency: int, max_tokens: int, stream: bool):
    """(text, latency s, completion tokens, perf_counter at its end, seconds to its first text or None when
    not streamed) per prompt, or None where it failed."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str):
        async with gate:
            start = time.perf_counter()
            try:
                if stream:
                    parts, tokens, first = [], 0, None
                    chunks = await client.completions.create(model="t2r", prompt=prompt, max_tokens=max_tokens,
                                                             temperature=0, stream=True)
                    async for chunk in chunks:
                        if chunk.choices:
                            parts.append(chunk.choices[0].text)
                            if first is None and parts[-1]:
                                first = time.perf_counter() - start
                        if chunk.usage is not None:
                            tokens = chunk.usage.completion_tokens
                    end = time.perf_counter()
                    return "".join(parts), end - start, tokens, end, first
                answer = await client.completions.create(model="t2r", prompt=prompt, max_tokens=max_tokens,
                                                         temperature=0)
                end = time.perf_counter()
                return answer.choices[0].text, end - start, answer.usage.completion_tokens, end, None
            except openai.OpenAIError:
                return None

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


class _PeakRss:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, proc):
        self.proc = proc
        self.peak = proc.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except OSError:
                return

