"""`t2r-export serve BUNDLE`: an OpenAI-compatible HTTP server with continuous batching (t2r_export/serve),
and `t2r-export serve-load BUNDLE`: its load test. Torch-free; needs the `serve` extra."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from ..serve.priority import PREFILL_NICE, resolve_prefill_nice
from .common import err_console, fail

SERVE_EXTRA = "install the server with `pip install 't2r-export[serve]'`"


def _bundle_and_name(bundle: Path, model_name: str | None):
    from ..runtime import BundleError, load_bundle

    try:
        loaded = load_bundle(bundle)
        loaded.load_tokenizer()
    except BundleError as err:
        fail(str(err))
    return loaded, model_name or Path(bundle).resolve().name


def serve(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `t2r-export onnx`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default answers this machine only."),
    port: int = typer.Option(8000, help="TCP port."),
    max_batch: int = typer.Option(64, help="Streams decoded together at most; more requests wait their turn."),
    max_prompt_tokens: int = typer.Option(4096, help="Longest prompt accepted, in tokens (longer: HTTP 400)."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Largest max_tokens a request may ask for."),
    prefix_cache_mb: float = typer.Option(64.0, help="Memory for cached prompt-prefix states (0 = no cache)."),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads; 0 = its default."),
    provider: str = typer.Option("cpu", help="cpu | cuda | ort-tensorrt (ONNX Runtime execution providers)."),
    model_name: str = typer.Option(None, help="The model id clients name (default: the bundle folder's name)."),
    prefill_batch: int = typer.Option(8, help="Prompts prefilled in one round at most (equal lengths in one "
                                               "graph call), on their own thread while the others decode."),
    prefill_arena: str = typer.Option("keep", help="keep | shrink | off: ONNX Runtime's CPU arena for prefills "
                                                   "(keep its blocks, hand them back after each run, none)."),
    stream_interval_ms: float = typer.Option(0.0, help="Streamed responses write at most every this many ms, the "
                                                       "tokens in between in one chunk (0 = every step)."),
    prefill_tokens: int = typer.Option(512, help="Tokens one prefill graph call takes at most (longer prompts go "
                                                 "on in pieces); its working memory is taken at start-up."),
    pin_decode: bool = typer.Option(False, "--pin-decode", help="With --threads 1: the decode thread gets the "
                                    "last allowed core to itself, the server's other threads the rest."),
    prefill_nice: int = typer.Option(None, help="Nice steps the prefill thread runs below the server, so busy "
                                     f"cores go to the running streams first (Linux; default {PREFILL_NICE}; "
                                     "0 = same priority)."),
) -> None:
    for name, value, low in (("--port", port, 0), ("--max-batch", max_batch, 1), ("--max-prompt-tokens",
                             max_prompt_tokens, 1), ("--max-tokens", max_tokens, 1), ("--threads", threads, 0),
                             ("--prefill-batch", prefill_batch, 1), ("--prefill-tokens", prefill_tokens, 1)):
        if value < low or (name == "--port" and value > 65535):
            fail(f"{name} must be {'in [0, 65535]' if name == '--port' else f'>= {low}'}, got {value}")
    if prefix_cache_mb < 0:
        fail(f"--prefix-cache-mb must be >= 0, got {prefix_cache_mb}")
    if not 0 <= stream_interval_ms <= 10_000:
        fail(f"--stream-interval-ms must be in [0, 10000], got {stream_interval_ms}")
    if prefill_arena not in ("keep", "shrink", "off"):
        fail(f"--prefill-arena must be keep, shrink or off, got {prefill_arena!r}")
    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.engine import GIL_SWITCH_S, Engine, decode_core_plan
    except ImportError as err:
        fail(f"`serve` needs {err.name}: {SERVE_EXTRA}")
    decode_cpu = None
    if pin_decode:
        try:
            decode_cpu, others = decode_core_plan(threads)
        except ValueError as err:
            fail(str(err))
    loaded, name = _bundle_and_name(bundle, model_name)
    _check_listen(host, port)
    if decode_cpu is not None:
        # every thread started from here on (the engine's, the event loop's helpers) keeps off the decode core
        os.sched_setaffinity(0, others)
    try:
        engine = Engine(loaded, max_batch=max_batch, threads=threads, provider=provider,
                        prefix_cache_bytes=int(prefix_cache_mb * (1 << 20)), prefill_batch=prefill_batch,
                        prefill_arena=prefill_arena, prefill_tokens=prefill_tokens, decode_cpu=decode_cpu,
                        prefill_nice=prefill_nice)
    except ValueError as err:
        fail(str(err))
    sys.setswitchinterval(GIL_SWITCH_S)
    app = create_app(engine, name, max_prompt_tokens, max_tokens, stream_interval_ms / 1000)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    engine.start()
    err_console.print(f"serving {name} ({bundle}) on http://{host}:{port}/v1, up to {max_batch} streams; "
                      "Ctrl-C stops", highlight=False, soft_wrap=True)
    try:
        server.run()
    finally:
        engine.stop()
    if not server.started:
        fail(f"could not listen on {host}:{port} (in use, or not an address of this machine)")


def _check_listen(host: str, port: int) -> None:
    """fail() in one line when ``host:port`` cannot be listened on (in use, or not this machine's address)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as err:
        fail(f"cannot listen on {host}:{port}: {err.strerror or err} (another server on that port, or an address "
             "this machine does not have); pick another --port or --host")


def serve_load(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `t2r-export onnx`."),
    streams: int = typer.Option(64, help="Concurrent requests (and the server's --max-batch)."),
    requests: int = typer.Option(256, help="Requests to send in all."),
    max_tokens: int = typer.Option(64, help="max_tokens of every request."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Server-sent events or whole responses."),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads of the server and the baseline."),
    json_out: Path = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
    prefill_batch: int = typer.Option(8, help="The server's --prefill-batch."),
    prefill_arena: str = typer.Option("keep", help="The server's --prefill-arena (keep | shrink | off)."),
    stream_interval_ms: float = typer.Option(0.0, help="The server's --stream-interval-ms."),
    prefill_tokens: int = typer.Option(512, help="The server's --prefill-tokens."),
    client: str = typer.Option("openai", help="openai | aiohttp: the load generator (aiohttp reads the JSON and "
                                              "the events itself, a lighter client on a machine it shares)."),
    engine_only: bool = typer.Option(False, "--engine-only", help="Run the serve engine alone in this process (no "
                                     "HTTP, no baseline) and print its RSS stage by stage."),
    pin_decode: bool = typer.Option(False, "--pin-decode", help="The server's --pin-decode (needs --threads 1); "
                                    "the client then keeps off the decode core too."),
    prefill_nice: int = typer.Option(None, help="The server's --prefill-nice (default: the server's default)."),
) -> None:
    """Start `serve` on a free 127.0.0.1 port, fire requests with the openai client, print the figures."""
    for name, value in (("--streams", streams), ("--requests", requests), ("--max-tokens", max_tokens),
                        ("--prefill-batch", prefill_batch), ("--prefill-tokens", prefill_tokens)):
        if value < 1:
            fail(f"{name} must be >= 1, got {value}")
    if engine_only and streams < 2:
        fail(f"--engine-only needs --streams >= 2, got {streams}")
    try:
        from ..serve.load import LoadError, run_load_test
        from ..serve.memory import report as engine_report
    except ImportError as err:
        fail(f"`serve-load` needs {err.name}: {SERVE_EXTRA}")
    _bundle_and_name(bundle, None)
    if prefill_arena not in ("keep", "shrink", "off"):
        fail(f"--prefill-arena must be keep, shrink or off, got {prefill_arena!r}")
    if not 0 <= stream_interval_ms <= 10_000:
        fail(f"--stream-interval-ms must be in [0, 10000], got {stream_interval_ms}")
    if client not in ("openai", "aiohttp"):
        fail(f"--client must be openai or aiohttp, got {client!r}")
    if prefill_nice is not None:
        try:
            resolve_prefill_nice(prefill_nice)
        except ValueError as err:
            fail(str(err))
    if prefill_nice is not None and engine_only:
        fail("--prefill-nice sets the server's prefill priority; --engine-only runs no server (drop one of them)")
    if pin_decode and engine_only:
        fail("--pin-decode pins the server's decode thread; --engine-only runs no server (drop one of them)")
    if pin_decode:
        from ..serve.engine import decode_core_plan

        try:
            decode_core_plan(threads)
        except ValueError as err:
            fail(str(err))
    if engine_only:
        for line in engine_report(bundle, streams, max_tokens, prefill_batch, prefill_arena, prefill_tokens):
            err_console.print(line, highlight=False, soft_wrap=True)
        return
    try:
        report = run_load_test(bundle, streams=streams, requests=requests, max_tokens=max_tokens, stream=stream,
                               threads=threads, prefill_batch=prefill_batch, prefill_arena=prefill_arena,
                               stream_interval_ms=stream_interval_ms, prefill_tokens=prefill_tokens,
                               client=client, pin_decode=pin_decode, prefill_nice=prefill_nice)
    except LoadError as err:
        fail(str(err), code=1)
    report.print(err_console)
    if json_out is not None:
        json_out.write_text(report.to_json())
    if report.lost or report.mixed:
        fail(f"{report.lost} requests lost and {report.mixed} mixed up", code=1)
