"""The HTTP side of `t2r-export serve`: FastAPI routes in OpenAI's shapes over one :class:`Engine`.

    /v1/completions, /v1/chat/completions   (stream=true: server-sent events, ending ``data: [DONE]``)
    /v1/models, /health, /metrics

Bad requests get a 4xx JSON body in OpenAI's error shape and never reach the decode loop;
a streaming client that disconnects cancels its request, which frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from ..runtime.sampling import SamplingParams
from .engine import Engine, EngineFull, Request, default_seed
from .protocol import (DEFAULT_CHAT_TOKENS, DEFAULT_COMPLETION_TOKENS, TURN_STOP, ApiError, ChatRequest,
                       CompletionRequest, Renderer, chat_segments, completion_prompt, error_body, new_id)


def create_app(engine: Engine, model_name: str, max_prompt_tokens: int = 4096, max_tokens_limit: int = 4096,
               stream_interval: float = 0.0):
    """The app; ``stream_interval`` (seconds): a streamed response writes at most that often, the text
    of the steps in between coalesced into one chunk per choice (0: every step that has text)."""
    app = FastAPI(title="t2r-export serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    add_bos = engine.bundle.tokenizer_config().get("add_bos_token") is True

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{where or 'the request'}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(message, param=where), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_, err: Exception):
        text = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
        return JSONResponse(error_body(f"internal error: {text}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def metrics():
        return engine.metrics()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "t2r-export"}]}

    def check_common(body, default_tokens: int, limit_field: int | None = None) -> tuple[int, SamplingParams]:
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found", "not_found_error")
        if not 1 <= body.n <= engine.max_batch:
            raise ApiError(400, f"n = {body.n} is outside [1, {engine.max_batch}] (the server's --max-batch)", "n")
        max_tokens = limit_field if limit_field is not None else body.max_tokens
        max_tokens = min(default_tokens, max_tokens_limit) if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= max_tokens_limit:
            raise ApiError(400, f"max_tokens = {max_tokens} is outside [1, {max_tokens_limit}] (the server's "
                           "--max-tokens limit)", "max_tokens")
        seed = default_seed() if body.seed is None else body.seed
        return max_tokens, SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=seed)

    def check_prompt(ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt")
        if len(ids) > max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, over this server's limit of {max_prompt_tokens} "
                           "(--max-prompt-tokens)", "prompt", "context_length_exceeded")
        bad = [t for t in ids if not 0 <= t < engine.config.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {engine.config.vocab_size})",
                           "prompt")
        limit = engine.config.max_position
        if limit is not None and len(ids) + max_tokens > limit:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                           f"max_position {limit}", "max_tokens", "context_length_exceeded")

    def encode(text: str, first: bool) -> list[int]:
        ids = engine.tokenizer.encode(text, add_special_tokens=first).ids
        bos = engine.config.bos_token_id
        if first and add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    async def run(http: HttpRequest, request: Request, events: EventBox, renderer: Renderer, stream: bool):
        try:
            engine.submit(request)
        except EngineFull as err:
            raise ApiError(429, str(err), code="rate_limit_exceeded", kind="rate_limit_error") from None

        def gone() -> None:
            request.cancel()
            events.put_nowait(GONE)

        if stream:
            return EventStream(_sse(request, events, renderer, stream_interval), gone)
        texts = [[] for _ in range(request.n)]
        reasons, tokens, left = [""] * request.n, 0, request.n
        watcher = watch_disconnect(http.receive, gone)
        try:
            while True:
                for event in await events.drain():
                    if event is GONE:
                        return JSONResponse(error_body("client disconnected"), status_code=499)
                    if event[0] == "text":
                        texts[event[-1]].append(event[1])
                    elif event[0] == "error":
                        return JSONResponse(error_body(event[2], "server_error"), status_code=event[1])
                    else:
                        reasons[event[-1]], tokens, left = event[1], tokens + event[2], left - 1
                        if not left:
                            return renderer.whole(["".join(t) for t in texts], reasons, tokens)
        finally:
            watcher.cancel()
            request.cancel()

    def make_request(ids, max_tokens, sampling, stops, body, cache_points=()):
        loop = asyncio.get_running_loop()
        events = EventBox()
        request = Request(ids, max_tokens, sampling, stops, loop, events, cache_points=tuple(cache_points),
                          incremental=body.stream, n=body.n)
        return request, events

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        max_tokens, sampling = check_common(body, DEFAULT_COMPLETION_TOKENS)
        prompt = completion_prompt(body)
        ids = list(prompt) if isinstance(prompt, list) else encode(prompt, True)
        check_prompt(ids, max_tokens)
        echo = (prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)) if body.echo else ""
        request, events = make_request(ids, max_tokens, sampling, body.stop_list(), body)
        renderer = Renderer("completion", new_id("cmpl"), model_name, len(ids), body.n, echo)
        return await run(http, request, events, renderer, body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest):
        max_tokens, sampling = check_common(body, DEFAULT_CHAT_TOKENS, body.max_completion_tokens)
        system, rest = chat_segments(body)
        head = encode(system, True) if system else []
        ids = head + encode(rest, not head)
        check_prompt(ids, max_tokens)
        stops = [*body.stop_list(), TURN_STOP]
        request, events = make_request(ids, max_tokens, sampling, stops, body, [len(head)] if head else [])
        renderer = Renderer("chat", new_id("chatcmpl"), model_name, len(ids), body.n)
        return await run(http, request, events, renderer, body.stream)

    return app


# put on a request's event queue when its client goes away
GONE = ("gone",)


class EventBox:
    """A request's events, handed over on its event loop (the decode thread's one call per step):
    ``put_nowait`` appends; ``drain`` waits for at least one and takes them all. What an open
    request holds is a list, and a future while it waits (an asyncio.Queue holds four deques and
    an Event, ~3 KB; measured: docs/design.md#serving-memory)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self):
        self._items: list = []
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, event) -> None:
        self._items.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def drain(self) -> list:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


def watch_disconnect(receive: Receive, gone: Callable[[], None]) -> asyncio.Task:
    """One bare task that waits on the connection's ASGI ``receive`` for ``http.disconnect`` (the body
    has been read by then) and calls ``gone``; the caller cancels it when its response is complete."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone()

    return asyncio.get_running_loop().create_task(wait())


class EventStream(StreamingResponse):
    """Server-sent events that notice a client going away with one bare task (``watch_disconnect``)
    instead of the task group Starlette's StreamingResponse opens for it per response under uvicorn,
    which holds ~20 KB per open stream (measured: docs/design.md#serving-memory)."""

    def __init__(self, content, gone: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.gone = gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = watch_disconnect(receive, self.gone)
        try:
            await self.stream_response(send)
        finally:
            watcher.cancel()
            # the request ends with its response, however that ended (answered, its send failed, its
            # client left): cancelled, its rows are freed at the next step; after a whole answer this
            # changes nothing
            self.gone()


async def _sse(request: Request, events: EventBox, renderer: Renderer, interval: float = 0.0):
    """Server-sent events: what piled up since the last write goes out in one write, each choice's
    text in one chunk; the last choice to end carries the request's usage (as OpenAI does with
    stream_options.include_usage)."""
    left, tokens = request.n, 0
    while left:
        events_now = await events.drain()
        if any(event is GONE for event in events_now):
            return
        texts: dict[int, list[str]] = {}
        out = []
        for event in events_now:
            if event[0] == "text":
                texts.setdefault(event[-1], []).append(event[1])
                continue
            # a choice's text goes out before its end
            pending = texts.pop(event[-1], None)
            if pending:
                out.append(renderer.chunk(event[-1], "".join(pending)))
            if event[0] == "error":
                out.append(f"data: {json.dumps(error_body(event[2], 'server_error'))}\n\n")
                left = 0
                break
            left, tokens = left - 1, tokens + event[2]
            out.append(renderer.chunk(event[-1], "", event[1], None if left else renderer.usage(tokens)))
        else:
            out[:0] = [renderer.chunk(index, "".join(parts)) for index, parts in texts.items()]
        yield "".join(out)
        if interval and left:
            # the steps of the next interval pile up in the queue and go out as one chunk each
            await asyncio.sleep(interval)
    yield "data: [DONE]\n\n"
