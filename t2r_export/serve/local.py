"""A server on a free 127.0.0.1 port inside this process, for tests and embedding.

    with local_server("bundle/", max_batch=8) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused")
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_server(bundle: str | Path, model_name: str = "t2r", max_batch: int = 8, threads: int = 1,
                 prefix_cache_bytes: int = 8 << 20, max_prompt_tokens: int = 4096, max_tokens_limit: int = 4096,
                 stream_interval: float = 0.0):
    """Yield the base URL (``http://127.0.0.1:PORT/v1``) of a running server; stop it on exit."""
    import uvicorn

    from ..runtime import load_bundle
    from .app import create_app
    from .engine import Engine

    engine = Engine(load_bundle(bundle), max_batch=max_batch, threads=threads, prefix_cache_bytes=prefix_cache_bytes)
    app = create_app(engine, model_name, max_prompt_tokens, max_tokens_limit, stream_interval)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    engine.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on 127.0.0.1:{port}")
            time.sleep(0.02)
        server.engine = engine
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
