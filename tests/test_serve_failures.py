"""The server's failure behaviour with a slow fake model behind the real engine, routes and uvicorn (in
this process, on loopback): a client that goes away mid-stream frees its slot at once; a full queue is a
429 with Retry-After; a request past --timeout is a 408 and frees its slot; the next request is answered
each time; random request bodies never give a 500 or hang (hypothesis, bounded)."""

import json
import string
import time
import types

import httpx
import pytest

pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_engine import Fake

from plutao.experiments.serve.api import create_app
from plutao.experiments.serve.local import LocalServer
from plutao.experiments.serve.served import Served
from plutao.model import engine as eng
from plutao.tokenizer import CharTokenizer


class Slow(Fake):
    """The fake model at about 100 steps a second, never ending a reply by itself: long replies take long."""

    @staticmethod
    def stop_ids(s):
        return tuple(s.stop_ids)

    def run(self, steps):
        time.sleep(0.01)
        return super().run(steps)


def start(tmp_path, *, slots=2, max_queue=4, timeout=None):
    tok = CharTokenizer.train([string.ascii_letters + string.digits + string.punctuation + " "])
    fake = Slow(slots)
    served = {"fake": Served("fake", tmp_path, "fake", tok, 10 ** 6, True, False,
                             model=types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=tok.vocab_size)),
                             backend=fake)}
    engine = eng.Engine({"fake": fake}, max_queue=max_queue, chunk=1)
    local = LocalServer(create_app(served, engine, timeout=timeout), ready_within=30)
    return local.url, engine, local


@pytest.fixture
def serving(tmp_path):
    started = []

    def go(**kw):
        started.append(start(tmp_path, **kw))
        return started[-1][:2]

    yield go
    for _, _, local in started:
        local.stop()


LONG = {"model": "fake", "prompt": "a", "max_tokens": 100000}


def settled(engine, seconds=1.0):
    deadline = time.monotonic() + seconds
    while (engine.slots_in_use() or engine.queue_depth()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.slots_in_use() == 0 and engine.queue_depth() == 0


def test_a_client_that_goes_away_mid_stream_frees_its_slot_within_a_second(serving):
    url, engine = serving()
    with httpx.stream("POST", url + "/v1/completions", json=LONG | {"stream": True}, timeout=10) as r:
        for _ in r.iter_lines():
            if engine.slots_in_use():
                break
    assert settled(engine, 1.0)
    assert httpx.get(url + "/metrics").text.count("plutao_slots_in_use 0.0") == 1
    short = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "a", "max_tokens": 3}, timeout=10)
    assert short.status_code == 200 and short.json()["choices"][0]["finish_reason"] == "length"


def test_a_non_streamed_request_whose_client_goes_away_frees_its_slot_too(serving):
    url, engine = serving()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=LONG, timeout=0.3)
    assert settled(engine, 1.5)


def test_a_full_queue_is_a_429_with_retry_after_and_the_next_request_is_answered(serving):
    url, engine = serving(slots=1, max_queue=1)
    streams = [httpx.stream("POST", url + "/v1/completions", json=LONG | {"stream": True}, timeout=10) for _ in range(2)]
    opened = [s.__enter__() for s in streams]
    deadline = time.monotonic() + 5
    while (engine.slots_in_use(), engine.queue_depth()) != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    r = httpx.post(url + "/v1/completions", json=LONG, timeout=10)
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    streamed = httpx.post(url + "/v1/completions", json=LONG | {"stream": True}, timeout=10)  # (refused before it starts)
    assert streamed.status_code == 429 and streamed.headers["retry-after"] == "1"
    for s, o in zip(streams, opened):
        s.__exit__(None, None, None)
    assert settled(engine, 2.0)
    assert httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_a_request_past_the_timeout_is_a_408_and_frees_its_slot(serving):
    url, engine = serving(timeout=0.3)
    r = httpx.post(url + "/v1/completions", json=LONG, timeout=10)
    assert r.status_code == 408 and "--timeout of 0.3 s" in r.json()["error"]["message"]
    assert settled(engine, 1.0)
    assert httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "a", "max_tokens": 2}).status_code == 200


def containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 6, 10 ** 6) | st.floats(allow_nan=True)
                    | st.text(max_size=8), containers, max_leaves=6)
FIELDS = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "logprobs", "echo", "stream", "top_logprobs", "stream_options")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/rewards"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6), model=st.booleans(),
       max_tokens=st.integers(1, 20))
def test_random_request_bodies_never_give_a_500_or_hang(fuzz_server, path, body, model, max_tokens):
    url, _ = fuzz_server
    if model:
        body = body | {"model": "fake"}
    if isinstance(body.get("max_tokens"), int) or "max_tokens" not in body:
        body["max_tokens"] = max_tokens  # (bounded: an accepted request ends quickly)
    content = json.dumps(body)  # (NaN and Infinity too, as Python's and JavaScript's encoders may write them)
    r = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=20)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    url, engine, local = start(tmp_path_factory.mktemp("fuzz"), slots=4, max_queue=64)
    yield url, engine
    local.stop()
