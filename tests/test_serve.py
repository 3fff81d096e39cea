"""`t2r-export serve` with the real openai client against a server on 127.0.0.1 (t2r_export/serve)."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from t2r_export import contract
from t2r_export.runtime import OrtDecoder, SamplingParams, generate, load_bundle
from t2r_export.serve.priority import PREFILL_NICE, thread_nice_supported
from t2r_export.serve.local import local_server

from hostile_helpers import assert_one_line_failure, invoke
from toy_bundle import build_toy_bundle

MODEL = "toy"
PROMPTS = ["def main():", "import os\nimport sys\n", "for i in range(10):", "class Point:", "print('hello",
           "the quick brown", "héllo wörld", "def f(x):\n    return", "import sys\nfor", "class A:\n    def"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_toy_bundle(tmp_path_factory.mktemp("serve") / "bundle", max_position=256)


@pytest.fixture(scope="module")
def server(bundle_dir):
    # max_batch 3 < the concurrent requests: rows join and leave while others decode
    with local_server(bundle_dir, model_name=MODEL, max_batch=3, max_prompt_tokens=150, max_tokens_limit=100) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


def _alone(bundle_dir, prompt, max_tokens, temperature=0.0, top_p=1.0, seed=0, stop=()):
    bundle = load_bundle(bundle_dir)
    with OrtDecoder(bundle, threads=1) as decoder:
        result = generate(decoder, bundle.load_tokenizer(), prompt, max_new_tokens=max_tokens, stop_strings=list(stop),
                          sampling=SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
    return result.rows[0]


def test_completion_equals_the_runtime(client, bundle_dir):
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    expected = _alone(bundle_dir, PROMPTS[0], 12)
    assert answer.choices[0].text == expected.text and expected.text
    assert answer.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert answer.usage.prompt_tokens == expected.prompt_tokens


def test_streamed_chunks_add_up_to_the_whole_answer(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0.8, seed=5)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0.8, seed=5,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_and_streamed_chat(client):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop please"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=1)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=1, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert "\n### " not in whole.choices[0].message.content


def test_concurrent_requests_equal_the_same_requests_alone(client, server, bundle_dir):
    jobs = [dict(prompt=p, max_tokens=8 + 3 * (i % 4), temperature=[0.0, 0.9][i % 2], top_p=[1.0, 0.9][i % 3 == 0],
                 seed=100 + i) for i, p in enumerate(PROMPTS)]

    def ask(job):
        return client.completions.create(model=MODEL, **job).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    alone = [ask(job) for job in jobs]
    assert together == alone
    assert together == [_alone(bundle_dir, j["prompt"], j["max_tokens"], j["temperature"], j["top_p"], j["seed"]).text
                        for j in jobs]
    assert len(set(together)) == len(jobs)


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_equal_runs_with_the_derived_seeds(client, bundle_dir, stream):
    """n > 1: one prefill forked into n rows; choice i samples as a lone request with seed + i."""
    job = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=1.0, seed=41)
    alone = [client.completions.create(**job | {"seed": 41 + i}) for i in range(3)]
    texts, reasons, usage = [""] * 3, [None] * 3, None
    if stream:
        for chunk in client.completions.create(**job, n=3, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                reasons[choice.index] = choice.finish_reason or reasons[choice.index]
            usage = chunk.usage or usage
    else:
        answer = client.completions.create(**job, n=3)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        texts, reasons = [c.text for c in answer.choices], [c.finish_reason for c in answer.choices]
        usage = answer.usage
    assert texts == [a.choices[0].text for a in alone]
    assert reasons == [a.choices[0].finish_reason for a in alone]
    assert texts == [_alone(bundle_dir, PROMPTS[3], 12, 1.0, seed=41 + i).text for i in range(3)]
    # sampled at temperature 1 the choices differ, so a fork that shared its rows' draws would show
    assert len(set(texts)) == 3
    assert usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert usage.prompt_tokens == alone[0].usage.prompt_tokens


def test_n_chat_choices(client):
    messages = [{"role": "user", "content": "a loop please"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, seed=3, n=2)
    alone = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, seed=3 + i)
             for i in range(2)]
    assert [c.message.content for c in answer.choices] == [a.choices[0].message.content for a in alone]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, seed=3, n=2,
                                                 stream=True))
    for index in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == answer.choices[index].message.content


def test_a_stream_interval_coalesces_steps_into_fewer_chunks(bundle_dir):
    job = dict(model=MODEL, prompt=PROMPTS[4], max_tokens=40, temperature=0)
    with local_server(bundle_dir, model_name=MODEL, max_batch=2, stream_interval=0.25) as url:
        chat = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        whole = chat.completions.create(**job)
        texts = [c.choices[0].text for c in chat.completions.create(**job, stream=True) if c.choices[0].text]
    assert "".join(texts) == whole.choices[0].text
    # 40 tokens of the toy model take far less than 0.25 s: the first step's text, then the rest at once
    assert whole.usage.completion_tokens == 40 and len(texts) <= 3


def test_stop_strings_end_the_answer_before_them(client, bundle_dir):
    free = _alone(bundle_dir, PROMPTS[2], 30).text
    stop = free[5:7]
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop])
    assert answer.choices[0].text == free[:free.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_models_health_metrics(server, client, bundle_dir):
    from t2r_export import contract

    assert [m.id for m in client.models.list().data] == [MODEL]
    root = server[:-len("/v1")]
    assert json.loads(urllib.request.urlopen(f"{root}/health").read())["status"] == "ok"
    metrics = json.loads(urllib.request.urlopen(f"{root}/metrics").read())
    assert metrics["max_batch"] == 3 and metrics["tokens_total"] > 0 and metrics["requests_total"] > 0
    assert metrics["state_bytes_per_stream"] == contract.state_nbytes(load_bundle(bundle_dir).config.state_shape)
    assert metrics["prefill_nice"] in (0, PREFILL_NICE)


def _post(server, path, body: bytes):
    request = urllib.request.Request(f"{server}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("path, body, status, needle", [
    ("/completions", b"{not json", 400, "not valid JSON"),
    ("/completions", json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "does not exist"),
    ("/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    ("/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    ("/completions", json.dumps({"model": MODEL, "prompt": "def " * 200}).encode(), 400, "over this server's limit"),
    ("/completions", json.dumps({"model": MODEL, "prompt": ""}).encode(), 400, "empty"),
    ("/completions", json.dumps({"model": MODEL, "prompt": [99999]}).encode(), 400, "outside the vocabulary"),
    ("/completions", json.dumps({"model": MODEL, "prompt": "x", "temperature": 9}).encode(), 400, "temperature"),
    ("/completions", json.dumps({"model": MODEL, "prompt": "x", "n": 0}).encode(), 400, "n = 0 is outside [1, 3]"),
    ("/completions", json.dumps({"model": MODEL, "prompt": "x", "n": 4}).encode(), 400, "n = 4 is outside [1, 3]"),
    ("/completions", json.dumps({"model": MODEL}).encode(), 400, "prompt"),
    ("/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages is empty"),
    ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}).encode(),
     400, "role"),
    ("/nowhere", b"{}", 404, "Not Found"),
])
def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_serving(server, client, path, body, status, needle):
    code, answer = _post(server, path, body)
    assert code == status, answer
    assert needle in answer["error"]["message"] and answer["error"]["type"]
    assert client.completions.create(model=MODEL, prompt="def", max_tokens=2, temperature=0).choices[0].text


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=101)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_disconnected_client_frees_its_row(tmp_path, stream):
    long_bundle = build_toy_bundle(tmp_path / "long", max_position=4200)
    with local_server(long_bundle, model_name=MODEL, max_batch=2, max_tokens_limit=4000) as url:
        root = url[:-len("/v1")]
        body = json.dumps({"model": MODEL, "prompt": "def", "max_tokens": 4000, "temperature": 0,
                           "stream": stream}).encode()
        if stream:
            request = urllib.request.Request(f"{url}/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            response = urllib.request.urlopen(request)
            assert response.readline().startswith(b"data: ")
            response.close()
        else:
            # a whole answer sends nothing until it is done: the client leaves once its row decodes
            host, port = urllib.parse.urlsplit(url).netloc.split(":")
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                deadline = time.monotonic() + 10
                while not json.loads(urllib.request.urlopen(f"{root}/metrics").read())["active_streams"]:
                    assert time.monotonic() < deadline, "the request never started decoding"
                    time.sleep(0.01)
        deadline = time.monotonic() + 10
        while (metrics := json.loads(urllib.request.urlopen(f"{root}/metrics").read()))["active_streams"]:
            assert time.monotonic() < deadline, "the disconnected request still holds its row"
            time.sleep(0.02)
    # it left long before its 4000 tokens
    assert 0 < metrics["tokens_total"] < 2000


def test_a_shared_system_prompt_is_prefilled_once(bundle_dir):
    system = {"role": "system", "content": "You are a careful Python programmer who writes short code."}
    with local_server(bundle_dir, model_name=MODEL, max_batch=2) as url, \
            local_server(bundle_dir, model_name=MODEL, max_batch=2, prefix_cache_bytes=0) as plain_url:
        answers = []
        for base in (url, plain_url):
            chat = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
            answers.append([chat.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
                system, {"role": "user", "content": question}]).choices[0].message.content
                for question in ("sort a list", "read a file", "sort a list")])
        metrics = json.loads(urllib.request.urlopen(url[:-3] + "/metrics").read())["prefix_cache"]
    assert answers[0] == answers[1]
    assert metrics["hits"] == 2 and metrics["entries"] == 3


def test_serve_cli_bad_input_fails_in_one_line(tmp_path, bundle_dir):
    assert_one_line_failure(invoke(["serve", tmp_path / "missing"]), 2, "does not exist")
    assert_one_line_failure(invoke(["serve", bundle_dir, "--max-batch", "0"]), 2, "--max-batch")
    assert_one_line_failure(invoke(["serve", bundle_dir, "--port", "70000"]), 2, "--port")
    assert_one_line_failure(invoke(["serve-load", bundle_dir, "--streams", "0"]), 2, "--streams")
    assert_one_line_failure(invoke(["serve", bundle_dir, "--prefill-batch", "0"]), 2, "--prefill-batch")
    assert_one_line_failure(invoke(["serve", bundle_dir, "--prefill-tokens", "0"]), 2, "--prefill-tokens")
    assert_one_line_failure(invoke(["serve-load", bundle_dir, "--prefill-tokens", "0"]), 2, "--prefill-tokens")
    assert_one_line_failure(invoke(["serve-load", bundle_dir, "--client", "curl"]), 2, "--client")
    assert_one_line_failure(invoke(["serve", bundle_dir, "--prefill-arena", "big"]), 2, "--prefill-arena")
    assert_one_line_failure(invoke(["serve", bundle_dir, "--stream-interval-ms", "-1"]), 2, "--stream-interval-ms")
    assert_one_line_failure(invoke(["serve-load", bundle_dir, "--prefill-arena", "big"]), 2, "--prefill-arena")
    assert_one_line_failure(invoke(["serve", bundle_dir, "--pin-decode"]), 2, "--pin-decode needs --threads 1")
    assert_one_line_failure(invoke(["serve-load", bundle_dir, "--pin-decode", "--threads", "2"]), 2,
                            "--pin-decode needs --threads 1")
    assert_one_line_failure(invoke(["serve-load", bundle_dir, "--pin-decode", "--engine-only", "--threads", "1"]), 2,
                            "--engine-only runs no server")
    assert_one_line_failure(invoke(["serve", bundle_dir, "--prefill-nice", "20"]), 2, "--prefill-nice must be in [0, 19]")
    assert_one_line_failure(invoke(["serve-load", bundle_dir, "--prefill-nice", "-1"]), 2,
                            "--prefill-nice must be in [0, 19]")
    assert_one_line_failure(invoke(["serve-load", bundle_dir, "--prefill-nice", "5", "--engine-only"]), 2,
                            "--engine-only runs no server")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_failure(invoke(["serve", bundle_dir, "--port", port]), 2, f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("client, stream, pin", [("openai", "--stream", ()), ("aiohttp", "--stream", ("--pin-decode",)),
                                                 ("aiohttp", "--no-stream", ("--prefill-nice", "0"))])
def test_bounded_load_test(bundle_dir, tmp_path, client, stream, pin):
    out = tmp_path / "load.json"
    result = invoke(["serve-load", bundle_dir, "--streams", "4", "--requests", "12", "--max-tokens", "8",
                     "--threads", "1", "--json", out, "--client", client, stream, *pin])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    # every answer was read whole and equals its prompt decoded alone
    assert report["client"] == client and report["stream"] == (stream == "--stream")
    assert report["pin_decode"] == ("--pin-decode" in pin)
    # the server reports the priority its prefill thread ran at: the default, or the one asked for
    default = PREFILL_NICE if thread_nice_supported() else 0
    assert report["prefill_nice"] == (0 if "--prefill-nice" in pin else default)
    assert report["full_concurrency_tokens_per_s"] > 0 and report["full_concurrency_ratio"] > 0
    assert report["lost"] == 0 and report["mixed"] == 0
    assert report["completion_tokens"] > 12 and report["tokens_per_s"] > 0
    # the baseline ran before and after the server; the ratio is to their mean
    before, after = report["baseline_before_tokens_per_s"], report["baseline_after_tokens_per_s"]
    assert before > 0 and after > 0 and report["baseline_tokens_per_s"] == pytest.approx((before + after) / 2)
    assert report["ratio"] == pytest.approx(report["tokens_per_s"] / report["baseline_tokens_per_s"])
    assert report["rss_peak_mb"] >= report["rss_idle_mb"] > 0
    assert report["p99_latency_s"] >= report["p50_latency_s"] > 0
    if stream == "--stream":
        # the first text arrives after the request is sent and before its answer ends
        assert 0 < report["first_text_p50_s"] <= report["first_text_p99_s"] <= report["p99_latency_s"]
        assert report["first_text_p50_s"] <= report["p50_latency_s"]
    else:
        assert report["first_text_p50_s"] is None and report["first_text_p99_s"] is None


def test_the_engine_alone_reports_its_memory_by_stage(bundle_dir):
    result = invoke(["serve-load", bundle_dir, "--engine-only", "--streams", "3", "--max-tokens", "6"])
    assert result.exit_code == 0, result.output
    # 4 x 3 requests of at most 6 tokens each after the lone one
    tokens = int(re.search(r"3 concurrent streams \(12 requests, (\d+) tokens in", result.output).group(1))
    assert 12 < tokens <= 72
    # the toy bundle's plain graphs update their state in place: one set per row
    config = load_bundle(bundle_dir).config
    row = contract.state_nbytes(config.state_shape, 1, config.state_dtype) + 4 * config.vocab_size
    assert "growth per extra stream" in result.output
    # the decoder's own share, measured in a fresh process beside the engine's figure
    assert re.search(r"the decoder alone, stepping 1\.\.3 rows, per extra row: +-?\d+\.\d KB", result.output), \
        result.output
    assert re.search(rf"by design: 1 state set \+ a logits row: +{row / 1e3:.1f} KB", result.output), result.output
    assert_one_line_failure(invoke(["serve-load", bundle_dir, "--engine-only", "--streams", "1"]), 2, "--streams >= 2")


def test_the_engine_report_says_why_the_decoder_alone_was_not_measured(bundle_dir, monkeypatch):
    """A child that dies (the out-of-memory killer, say) leaves that one line saying so; the rest stands."""
    from t2r_export.bench.child import ChildProcessFailed
    from t2r_export.serve import memory

    def dies(*args, **kwargs):
        raise ChildProcessFailed("the decoder rows process ended without an answer (exit code -9)")

    monkeypatch.setattr(memory, "run_in_child", dies)
    lines = memory.report(bundle_dir, streams=2, max_tokens=4)
    assert "growth per extra stream" in "\n".join(lines)
    assert re.search(r"the decoder alone, stepping 1\.\.2 rows, per extra row: not measured \(the decoder rows "
                     r"process ended without an answer \(exit code -9\)\)$", lines[-1]), lines[-1]


class _Sink:
    """Stands in for an asyncio loop and queue: events are collected on the decode thread."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def call_soon_threadsafe(self, function, *args):
        function(*args)

    def put_nowait(self, event):
        self.events.append(event)
        if event[0] in ("done", "error"):
            self.done.set()


def test_the_engine_takes_its_working_memory_at_start_and_bounds_each_prefill(bundle_dir):
    """The engine steps a throwaway max-batch state and prefills its staging rows once at start, with no
    per-shape memory pattern, and no later prefill call takes more than --prefill-tokens tokens; the
    streams' own rows stay unwritten until used, and a prompt prefilled in pieces answers as it does alone."""
    from t2r_export.serve.engine import Engine, Request

    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, max_batch=3, threads=1, prefix_cache_bytes=0, prefill_batch=2, prefill_tokens=8)
    try:
        for session in engine.decoder._sessions.values():
            assert session.get_session_options().enable_mem_pattern is False
        assert all(not value.any() for value in engine.decoder.read_state().values())
        # the step's IO binding of every count of active rows exists before the first request (one per
        # count: the toy bundle's graphs update in place, so both parities bind the same buffers)
        made = dict(engine.decoder._io._steps)
        assert sorted(made) == [(rows, 0) for rows in range(1, 4)]
        tokens = []
        for name in ("prefill_rows", "extend_row"):
            original = getattr(engine.staging, name)
            setattr(engine.staging, name, lambda first, ids, pos, original=original: tokens.append(ids.size)
                    or original(first, ids, pos))
        engine.start()
        prompt = "import os\nimport sys\nfor name in sys.argv:\n    print(name)\n"
        ids = bundle.load_tokenizer().encode(prompt).ids
        assert len(ids) > 8
        sink = _Sink()
        engine.submit(Request(ids, 12, SamplingParams(temperature=0.0, seed=0), [], sink, sink))
        assert sink.done.wait(60)
        # serving made no binding of its own: the ones from the start are the ones it used
        assert engine.decoder._io._steps == made
    finally:
        engine.stop()
    assert tokens and max(tokens) <= 8 and sum(tokens) == len(ids)
    text = "".join(event[1] for event in sink.events if event[0] == "text")
    assert text == _alone(bundle_dir, prompt, 12).text
    with pytest.raises(ValueError, match="--prefill-tokens must be >= 1"):
        Engine(bundle, max_batch=2, prefill_tokens=0)


def test_a_round_is_prefilled_while_the_batch_is_full_and_joins_when_a_row_frees(bundle_dir):
    """With every decode row busy, the next request is prefilled at once (not when a row frees) and
    answers as it does alone."""
    from t2r_export.serve.engine import Engine, Request

    bundle = load_bundle(bundle_dir)
    tokenizer = bundle.load_tokenizer()
    engine = Engine(bundle, max_batch=1, threads=1, prefix_cache_bytes=0, prefill_batch=1)
    busy, second = [], threading.Event()
    original, step = engine._prefill, engine.decoder.step_rows

    def prefill(joining):
        busy.append(len(engine._active))
        if len(busy) == 2:
            second.set()
        return original(joining)

    def stepping(*args):
        # the first request's steps wait (10 s at most) for the second's prefill, so no timing decides
        second.wait(10)
        return step(*args)

    engine._prefill, engine.decoder.step_rows = prefill, stepping
    sinks = [_Sink(), _Sink()]
    try:
        engine.start()
        for prompt, sink, tokens in zip(PROMPTS[:2], sinks, (40, 6)):
            engine.submit(Request(tokenizer.encode(prompt).ids, tokens, SamplingParams(temperature=0.0, seed=0), [],
                                  sink, sink))
        assert all(sink.done.wait(60) for sink in sinks)
    finally:
        engine.stop()
    # the second prompt went through the graph while the first still held the only row
    assert busy == [0, 1]
    for prompt, sink, tokens in zip(PROMPTS[:2], sinks, (40, 6)):
        assert "".join(e[1] for e in sink.events if e[0] == "text") == _alone(bundle_dir, prompt, tokens).text


def test_events_leave_before_the_step_runs_and_finished_requests_leave_no_cycles(bundle_dir):
    """Each step's tokens are handed to the event loop before the graph runs (the loop works while
    the step holds no GIL), and a finished request is freed by reference counting: nothing of it
    waits for the cycle collector, whose rare full passes would let served requests pile up."""
    import gc

    from t2r_export.serve.engine import Choice, Engine, Request

    bundle = load_bundle(bundle_dir)
    tokenizer = bundle.load_tokenizer()
    engine = Engine(bundle, max_batch=2, threads=1, prefix_cache_bytes=0, prefill_batch=2)
    waiting, step = [], engine.decoder.step_rows

    def stepping(*args):
        waiting.append(len(engine._outbox))
        return step(*args)

    engine.decoder.step_rows = stepping
    sinks = [_Sink() for _ in PROMPTS[:3]]
    gc.collect()
    gc.disable()
    try:
        engine.start()
        for prompt, sink in zip(PROMPTS[:3], sinks):
            engine.submit(Request(tokenizer.encode(prompt).ids, 8, SamplingParams(temperature=0.7, seed=1), [],
                                  sink, sink))
        assert all(sink.done.wait(60) for sink in sinks)
        engine.stop()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, (Request, Choice))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert waiting and max(waiting) == 0
    assert left == []


def test_a_pinned_decode_thread_keeps_a_core_to_itself(bundle_dir, monkeypatch):
    """--pin-decode: the decode thread runs on the last allowed core alone and answers as unpinned;
    the plan refuses what it cannot do in one line."""
    import os

    from t2r_export.serve.engine import Engine, Request, decode_core_plan

    cpus = sorted(os.sched_getaffinity(0))
    core, others = decode_core_plan(1)
    assert core == cpus[-1] and others == set(cpus[:-1]) and core not in others
    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, max_batch=2, threads=1, prefix_cache_bytes=0, decode_cpu=core)
    sink = _Sink()
    try:
        engine.start()
        engine.submit(Request(bundle.load_tokenizer().encode(PROMPTS[0]).ids, 8, SamplingParams(temperature=0.0),
                              [], sink, sink))
        assert sink.done.wait(60)
        decode = next(t for t in engine._threads if t.name == "t2r-decode")
        assert os.sched_getaffinity(decode.native_id) == {core}
    finally:
        engine.stop()
    assert "".join(e[1] for e in sink.events if e[0] == "text") == _alone(bundle_dir, PROMPTS[0], 8).text
    with pytest.raises(ValueError, match="--pin-decode needs --threads 1"):
        decode_core_plan(0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(ValueError, match="needs at least 2 cores"):
        decode_core_plan(1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are a Linux feature")
def test_the_prefill_thread_runs_below_the_decode_thread(bundle_dir):
    """By default the prefill thread is PREFILL_NICE nice steps below the server and the decode thread keeps
    the server's priority; answers are the same; --prefill-nice 0 leaves both alone; bad values are refused."""
    import os

    from t2r_export.serve.engine import Engine, Request

    bundle = load_bundle(bundle_dir)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    ids = bundle.load_tokenizer().encode(PROMPTS[0]).ids
    for nice, want in ((None, min(19, base + PREFILL_NICE)), (0, base), (3, min(19, base + 3))):
        engine = Engine(bundle, max_batch=2, threads=1, prefix_cache_bytes=0, prefill_nice=nice)
        sink = _Sink()
        try:
            engine.start()
            engine.submit(Request(ids, 8, SamplingParams(temperature=0.0), [], sink, sink))
            assert sink.done.wait(60)
            threads = {t.name: t.native_id for t in engine._threads}
            assert os.getpriority(os.PRIO_PROCESS, threads["t2r-prefill"]) == want
            assert os.getpriority(os.PRIO_PROCESS, threads["t2r-decode"]) == base
            assert engine.metrics()["prefill_nice"] == (PREFILL_NICE if nice is None else nice)
        finally:
            engine.stop()
        assert "".join(e[1] for e in sink.events if e[0] == "text") == _alone(bundle_dir, PROMPTS[0], 8).text
    # the server's own priority is untouched
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
    for bad in (-1, 20):
        with pytest.raises(ValueError, match=r"--prefill-nice must be in \[0, 19\]"):
            Engine(bundle, max_batch=2, prefill_nice=bad)


def test_the_full_concurrency_rate_counts_the_answers_between_the_first_wave_and_the_drain():
    from t2r_export.serve.load import _full_concurrency_rate

    # 7 requests at 2 concurrent: the first wave ends with the 2nd answer (t = 2 s), the last request
    # goes out at the 5th (t = 6 s); the 3rd to 5th answers (30 + 40 + 50 tokens) end in between
    done = [("a", 1.0, 10, 1.0), ("b", 2.0, 40, 5.0), ("c", 1.0, 20, 2.0), ("d", 1.0, 30, 3.0),
            ("e", 5.0, 50, 6.0), ("f", 6.0, 60, 10.0), ("g", 6.0, 70, 11.0)]
    assert _full_concurrency_rate(done, requests=7, streams=2) == pytest.approx((30 + 40 + 50) / (6.0 - 2.0))
    # no stretch between the first wave and the drain
    assert _full_concurrency_rate(done[:4], requests=4, streams=2) is None
    # lost answers leave too few to say
    assert _full_concurrency_rate(done[:3], requests=7, streams=2) is None


def test_greedy_rows_hold_no_generator(bundle_dir):
    """A choice's generator (about 2 KB) is made at its first sampled token: greedy rows never hold one."""
    from t2r_export.serve.engine import Engine, Request

    bundle = load_bundle(bundle_dir)
    tokenizer = bundle.load_tokenizer()
    engine = Engine(bundle, max_batch=2, threads=1, prefix_cache_bytes=0)
    seen, step = {}, engine.decoder.step_rows

    def stepping(*args):
        for choice in engine._active:
            seen.setdefault(choice.request.sampling.greedy, set()).add(choice._rng is None)
        return step(*args)

    engine.decoder.step_rows = stepping
    sinks = [_Sink(), _Sink()]
    try:
        engine.start()
        for sink, temperature in zip(sinks, (0.0, 0.9)):
            engine.submit(Request(tokenizer.encode(PROMPTS[0]).ids, 6, SamplingParams(temperature=temperature, seed=2),
                                  [], sink, sink))
        assert all(sink.done.wait(60) for sink in sinks)
    finally:
        engine.stop()
    assert seen == {True: {True}, False: {False}}


def test_an_event_box_hands_over_everything_put_in_order_and_wakes_its_reader():
    import asyncio

    from t2r_export.serve.app import EventBox

    async def scenario():
        box = EventBox()
        box.put_nowait(("text", "a", 0))
        box.put_nowait(("text", "b", 0))
        assert await box.drain() == [("text", "a", 0), ("text", "b", 0)]
        reader = asyncio.ensure_future(box.drain())
        await asyncio.sleep(0)
        assert not reader.done()
        loop = asyncio.get_running_loop()
        # as the decode thread hands a step's events over: from another thread, onto the loop
        threading.Thread(target=lambda: loop.call_soon_threadsafe(box.put_nowait, ("done", "eos", 2, 0))).start()
        assert await asyncio.wait_for(reader, 5) == [("done", "eos", 2, 0)]
        assert box._waiter is None and box._items == []

    asyncio.run(scenario())


def test_a_streamed_response_watches_for_its_client_with_one_task_and_frees_the_request_when_it_goes():
    """The response streams in its own task plus one watcher (Starlette's StreamingResponse opens a
    task group per response under uvicorn, ~20 KB an open stream); a client that leaves calls ``gone``."""
    import asyncio

    from t2r_export.serve.app import EventStream

    async def scenario(leave: bool):
        incoming: asyncio.Queue = asyncio.Queue()
        sent, gone, more = [], [], asyncio.Event()

        async def body():
            yield "data: a\n\n"
            await more.wait()
            if not gone:
                yield "data: b\n\n"

        def on_gone():
            gone.append(True)
            more.set()

        async def send(message):
            sent.append(message)

        response = EventStream(body(), on_gone)
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
        task = asyncio.ensure_future(response(scope, incoming.get, send))
        while len(sent) < 2:
            await asyncio.sleep(0)
        # this test's task, the response's and its watcher: nothing more per open stream
        assert len(asyncio.all_tasks()) == 3
        if leave:
            incoming.put_nowait({"type": "http.disconnect"})
        else:
            more.set()
        await asyncio.wait_for(task, 5)
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == 1, "the watcher outlived its response"
        bodies = [m.get("body") for m in sent if m["type"] == "http.response.body"]
        assert sent[0]["status"] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
        return bodies, gone

    bodies, gone = asyncio.run(scenario(leave=False))
    assert bodies == [b"data: a\n\n", b"data: b\n\n", b""] and gone == [True]   # the finally's call: a no-op then
    bodies, gone = asyncio.run(scenario(leave=True))
    assert bodies == [b"data: a\n\n", b""] and gone[0] is True
