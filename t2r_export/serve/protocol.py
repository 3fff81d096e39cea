"""The OpenAI-compatible request and response shapes `t2r-export serve` speaks, and its chat template.

Requests are checked here, before they reach the decode loop; every problem becomes an
:class:`ApiError` that the app turns into OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

The chat template (the bundled models are not chat-tuned, so any plain template serves; this one
is documented in docs/deploy.md) renders each message as ``### Role:\\n{content}\\n\\n`` and ends
with ``### Assistant:\\n``. The system messages are encoded separately from the rest, so the state
after them is a clean prefix the prefix cache can reuse for every conversation that shares them.
Generation stops at the next ``\\n### `` turn header.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("system", "user", "assistant")
Kind = Literal["completion", "chat"]
TURN_STOP = "\n### "
DEFAULT_COMPLETION_TOKENS = 16
DEFAULT_CHAT_TOKENS = 256


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Request(BaseModel):
    # unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    n: int = 1

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop holds {len(stops)} strings; at most 4 are allowed", "stop")
        return [s for s in stops if s]


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


def completion_prompt(request: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text, or token ids."""
    prompt = request.prompt
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return list(prompt)
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ApiError(400, "prompt must be one string (or one list of token ids); batches of prompts are "
                           "not supported, send one request each", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(400, "prompt is empty; give at least one character of text", "prompt")
    return prompt


def chat_segments(request: ChatRequest) -> tuple[str, str]:
    """(system part, rest) of the rendered conversation; the rest ends with the assistant's header."""
    if not request.messages:
        raise ApiError(400, "messages is empty; give at least one message", "messages")
    system, rest = [], []
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise ApiError(400, f"messages[{index}].role is {message.role!r}; expected one of {', '.join(ROLES)}",
                           f"messages[{index}].role")
        text = _content_text(message.content, index)
        block = f"### {message.role.title()}:\n{text}\n\n"
        # leading system messages form the cacheable prefix
        (system if message.role == "system" and not rest else rest).append(block)
    rest.append("### Assistant:\n")
    return "".join(system), "".join(rest)


def _content_text(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{index}].content holds a {part.get('type')!r} part; only text parts "
                           "are supported", f"messages[{index}].content")
        parts.append(part["text"])
    return "".join(parts)


def finish_reason(reason: str) -> str:
    """Runtime reasons (eos, stop, length) as OpenAI's (stop, length)."""
    return "length" if reason == "length" else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Renderer:
    """The bodies of one response with ``n`` choices: whole (a dict), or server-sent-event chunks.

    A chunk is the same JSON around a different text, so its fixed parts are rendered once per
    response and each chunk costs one ``json.dumps`` of its text (64 streams at one chunk per step
    each make this the server's most frequent piece of work).
    """

    def __init__(self, kind: Kind, rid: str, model: str, prompt_tokens: int, n: int = 1, echo: str = ""):
        self.kind, self.rid, self.model, self.n, self.echo = kind, rid, model, n, echo
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        self._head = (f'data: {{"id":{json.dumps(rid)},"object":"{obj}","created":{self.created},'
                      f'"model":{json.dumps(model)},"choices":[{{"index":')
        self._started: set[int] = set()

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def chunk(self, index: int, text: str, reason: str | None = None, usage: dict | None = None) -> str:
        """One ``data: ...`` event for choice ``index``: its new text, or its end (``reason``, and the
        usage of the whole request on the last choice to end)."""
        finish = "null" if reason is None else f'"{finish_reason(reason)}"'
        if self.kind == "completion":
            body = f'"text":{json.dumps(text)},"logprobs":null,"finish_reason":{finish}}}]'
        else:
            fields = [f'"content":{json.dumps(text)}'] if text or reason is None else []
            if index not in self._started:
                self._started.add(index)
                fields.insert(0, '"role":"assistant"')
            body = f'"delta":{{{",".join(fields)}}},"logprobs":null,"finish_reason":{finish}}}]'
        tail = "}" if usage is None else f',"usage":{json.dumps(usage)}}}'
        return f"{self._head}{index},{body}{tail}\n\n"

    def whole(self, texts: list[str], reasons: list[str], completion_tokens: int) -> dict:
        choices = []
        for index, (text, reason) in enumerate(zip(texts, reasons)):
            if self.kind == "completion":
                choices.append({"index": index, "text": self.echo + text, "logprobs": None,
                                "finish_reason": finish_reason(reason)})
            else:
                choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                "finish_reason": finish_reason(reason)})
        return {"id": self.rid, "object": "text_completion" if self.kind == "completion" else "chat.completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage(completion_tokens)}


