"""The OpenAI-compatible HTTP API, driven by the official ``openai`` package against a live loopback server.

One engine (the demo model) serves both fronts: uvicorn with the HTTP API and the gRPC server, so the module
pays for one compile. The HTTP server is started before the engine exists, as ``jdisagg launch`` does, to
check that it answers 503 until warm.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from jdisagg.chat_template import ChatTemplate
from jdisagg.engine import Engine
from jdisagg.sampling_params import SamplingParams
from jdisagg.serving.client import make_request
from jdisagg.serving.openai.defaults import GenerationDefaults
from jdisagg.serving.openai.server import HTTPServer
from jdisagg.serving.server import GenerationServer
from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc

MODEL = "demo"
MAX_QUEUE = 8


@pytest.fixture(scope="module")
def live() -> Iterator[dict]:
    http = HTTPServer("127.0.0.1", 0, MODEL, ChatTemplate.for_model(None))
    base = f"http://127.0.0.1:{http.port}"
    before_warm = {"health": httpx.get(f"{base}/health").status_code,
                   "completion": httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x"})}
    engine = Engine(None, prefill_mesh="1x1", decode_mesh="1x1", max_batch=4, max_context=128,
                    max_queue=MAX_QUEUE, progress=False)
    grpc_server = GenerationServer("127.0.0.1", 0, 32)
    grpc_server.serve(engine, "127.0.0.1", 0)
    http.serve(engine)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        yield {"http": http, "base": base, "engine": engine, "client": client, "before_warm": before_warm,
               "grpc": f"127.0.0.1:{grpc_server.port}"}
    finally:
        client.close()
        http.shutdown()
        grpc_server.shutdown(engine, 5.0)


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return live["client"]


def _pages_used(engine: Engine) -> float:
    text = generate_latest(engine.metrics.registry).decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "jdisagg_kv_pages_used")


def _wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (engine.stats()["live"] or _pages_used(engine)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["live"] == 0 and _pages_used(engine) == 0
    assert engine.stats()["pages_used"] == [0]


def test_health_is_503_until_warm_then_200(live):
    assert live["before_warm"]["health"] == 503
    early = live["before_warm"]["completion"]
    assert early.status_code == 503 and "starting up" in early.json()["error"]["message"]
    assert httpx.get(f"{live['base']}/health").status_code == 200


def test_models_lists_the_served_model(client, live):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == live["engine"].max_context


def test_completion_matches_the_engine_and_counts_usage(client, live):
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=7)
    expected = live["engine"].generate(["ROMEO:"], params)[0]
    reply = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=0.8, seed=7)
    choice = reply.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion" and reply.created > 0
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (6, 12, 18)
    again = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=0.8, seed=7)
    assert again.choices[0].text == choice.text  # the seed reproduces


def test_streamed_completion_equals_the_unary_one_with_usage_last(client):
    kwargs = {"model": MODEL, "prompt": [72, 101, 108, 108, 111], "max_tokens": 10, "temperature": 1.0,
              "seed": 3}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == 5


def test_n_choices_differ_and_stop_ends_them(client):
    reply = client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=24, temperature=1.0, seed=11,
                                      n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text != reply.choices[1].text
    assert reply.usage.prompt_tokens == 7 and reply.usage.completion_tokens == 48
    greedy = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, temperature=0)
    stop = greedy.choices[0].text[5:8]
    stopped = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy.choices[0].text[: greedy.choices[0].text.index(stop)]


def test_chat_streamed_and_not(client, live):
    messages = [{"role": "system", "content": "Speak as a player."}, {"role": "user", "content": "Who goes?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=16,
                                           temperature=0.7, seed=5, extra_body={"return_token_ids": True})
    prompt = ChatTemplate.for_model(None).encode(live["engine"].tokenizer, messages)
    assert reply.choices[0].model_extra["prompt_token_ids"] == prompt
    expected = live["engine"].generate([prompt], SamplingParams(max_tokens=16, temperature=0.7, seed=5))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 16
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0.7,
                                            seed=5, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_equal_the_engines(client, live):
    expected = live["engine"].generate(["ROMEO:"], SamplingParams(max_tokens=6, temperature=0.9, seed=2,
                                                                   logprobs=3))[0]
    reply = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=6, temperature=0.9, seed=2,
                                      logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    for got, want in zip(logprobs.top_logprobs, expected.top_logprobs, strict=True):
        assert list(got.values()) == pytest.approx([lp for _, lp in want], abs=1e-5)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hail"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5) for entry in content)


def test_http_and_grpc_give_identical_tokens_and_logprobs(client, live):
    reply = client.completions.create(model=MODEL, prompt="KING:", max_tokens=16, temperature=1.0, seed=99,
                                      logprobs=3, extra_body={"top_k": 50, "return_token_ids": True})
    request = make_request("KING:", max_tokens=16, temperature=1.0, top_k=50, seed=99)
    request.sampling.logprobs = 3
    with grpc.insecure_channel(live["grpc"]) as channel:
        stub = pb_grpc.GenerationStub(channel)
        unary = stub.GenerateUnary(request, timeout=60)
        streamed = list(stub.Generate(request, timeout=60))
    assert reply.choices[0].model_extra["token_ids"] == list(unary.token_ids)
    assert reply.choices[0].text == unary.text
    assert reply.choices[0].logprobs.token_logprobs == pytest.approx(list(unary.logprobs), abs=1e-5)
    for got, top in zip(reply.choices[0].logprobs.top_logprobs, unary.top_logprobs, strict=True):
        assert len(top.token_ids) == 3
        assert list(got.values()) == pytest.approx(list(top.logprobs), abs=1e-5)
    # The stream carries one entry per token, in its messages' order.
    assert [t for m in streamed for t in m.token_ids] == list(unary.token_ids)
    assert [lp for m in streamed for lp in m.logprobs] == list(unary.logprobs)
    assert [list(t.token_ids) for m in streamed for t in m.top_logprobs] == [
        list(t.token_ids) for t in unary.top_logprobs]
    # A request that does not ask gets none, as before the field existed.
    plain = make_request("KING:", max_tokens=4)
    with grpc.insecure_channel(live["grpc"]) as channel:
        assert not pb_grpc.GenerationStub(channel).GenerateUnary(plain, timeout=60).top_logprobs


def test_cancelled_stream_frees_its_pages(client, live):
    stream = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=120, temperature=1.0,
                                       stream=True, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert _pages_used(live["engine"]) > 0
    stream.close()
    _wait_idle(live["engine"])


def _aborted(engine: Engine) -> float:
    text = generate_latest(engine.metrics.registry).decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "jdisagg_requests_total" and s.labels.get("outcome") == "abort")


def test_client_gone_while_a_unary_request_waits_cancels_it(live):
    """The client sends a non-streaming request and hangs up at once; the server notices and aborts."""
    aborted = _aborted(live["engine"])
    body = json.dumps({"model": MODEL, "prompt": "ROMEO:", "max_tokens": 120, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", live["http"].port)) as connection:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        connection.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while _aborted(live["engine"]) == aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _aborted(live["engine"]) == aborted + 1
    _wait_idle(live["engine"])


BAD_REQUESTS = [
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [300]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 200}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", b'{"model": "demo", "prompt": ', 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS,
                         ids=[f"{i}-{b['model'] if isinstance(b, dict) else 'json'}" for i, (_, b, _, _) in
                              enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_error_json(live, path, body, status, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    reply = httpx.post(f"{live['base']}{path}", timeout=60, **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_still_serving_after_bad_requests(client, live):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    _wait_idle(live["engine"])


def test_full_queue_is_429_and_leaves_nothing_queued(client, live):
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=4, n=2 * MAX_QUEUE)
    assert err.value.body["type"] == "rate_limit_error"
    _wait_idle(live["engine"])


def test_chat_without_a_template_is_400_and_defaults_apply(live):
    """A second HTTP front on the same engine: no chat template, and greedy as the model's default."""
    http = HTTPServer("127.0.0.1", 0, MODEL, None, GenerationDefaults(temperature=0.0))
    http.serve(live["engine"])
    try:
        base = f"http://127.0.0.1:{http.port}/v1"
        reply = httpx.post(f"{base}/chat/completions", timeout=60,
                           json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert reply.status_code == 400 and "no chat template" in reply.json()["error"]["message"]
        body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 8}
        text = httpx.post(f"{base}/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert text == live["engine"].generate(["ROMEO:"], SamplingParams(max_tokens=8))[0].text
    finally:
        http.shutdown()


def _launch_fails(*flags: str) -> str:
    """A ``jdisagg launch`` that must stop before loading the model: its one-line error."""
    run = subprocess.run([sys.executable, "-m", "jdisagg.cli", "launch", "--port", "0", "--metrics-port", "0",
                          *flags], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("jdisagg: error:")]
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_launch_refuses_a_missing_chat_template(tmp_path):
    missing = tmp_path / "missing.jinja"
    assert _launch_fails("--chat-template", str(missing)) == (
        f"jdisagg: error: chat template file {str(missing)!r} does not exist")


def test_a_taken_http_port_is_refused_at_once():
    """Before the engine is built (launch turns this OSError into its one-line exit 2)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            HTTPServer("127.0.0.1", port, MODEL, None)
