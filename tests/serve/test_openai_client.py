"""The real `openai` client against a real uvicorn on 127.0.0.1 (a free port, in a thread): chat and
completions, streaming and not; greedy answers equal `chat`/`generate`; concurrency; disconnects cancel."""

from __future__ import annotations

import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from baichuan.generate import chat, generate_tokens, stream_text  # noqa: E402
from baichuan.serve.app import create_app  # noqa: E402
from tests.serve import running_server  # noqa: E402

MODEL = "tiny-baichuan2"
KEY = "test-key"
HELLO = [{"role": "user", "content": "你好, hello"}]


@pytest.fixture(scope="module")
def server(loaded):
    app = create_app(loaded, model_name=MODEL, api_key=KEY, max_batch=4, max_queue=16)
    with running_server(app) as url:
        yield url, app.state.serving.engine


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30) as client:
        yield client


def greedy(loaded, n):
    return loaded.sampling.replace(do_sample=False, max_new_tokens=n)


def chat_reference(loaded, messages, n) -> str:
    return chat(loaded.model, loaded.tokenizer, messages, greedy(loaded, n), chat_format=loaded.chat_format)


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat(client, loaded):
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=20)
    assert answer.choices[0].message.content == chat_reference(loaded, HELLO, 20)
    prompt = loaded.chat_format.build(loaded.tokenizer.encode, HELLO, 10**6, 0)
    eos = loaded.sampling.eos_ids + loaded.chat_format.stop_ids
    tokens = list(generate_tokens(loaded.model, prompt, greedy(loaded, 20).replace(eos_ids=eos)))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(tokens))
    assert answer.usage.total_tokens == len(prompt) + len(tokens)
    assert answer.choices[0].finish_reason == ("length" if len(tokens) == 20 else "stop")


def test_chat_stream(client, loaded):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Write a poem. 写一首诗。"},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": "again"},
    ]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_reference(loaded, messages, 20)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions(client, loaded):
    prompt = "The capital of 中国 is"
    ids = loaded.tokenizer.encode(prompt)
    reference = "".join(stream_text(loaded.model, loaded.tokenizer, ids, greedy(loaded, 16)))
    answer = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert answer.choices[0].text == reference
    assert answer.usage.prompt_tokens == len(ids)
    stream = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == reference


def test_concurrent_streams_are_batched_and_each_equals_its_single_run(client, server, loaded):
    _, engine = server
    questions = ["one", "二", "three 三", "four", "five 五"]  # 5 > max_batch 4: one waits in the queue
    expected = {q: chat_reference(loaded, [{"role": "user", "content": q}], 24) for q in questions}
    got: dict[str, str] = {}
    before = engine.stats.max_running

    def ask(question):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=24,
            stream=True,
        )
        got[question] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == expected
    assert engine.stats.max_running >= 2 or before >= 2


def test_errors_reach_the_client_as_openai_exceptions(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="hello " * 400)
    url, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as intruder:
        with pytest.raises(openai.AuthenticationError):
            intruder.models.list()


def _wait_idle(engine, cancelled_before: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.running == 0 and engine.stats.cancelled > cancelled_before:
            return
        time.sleep(0.02)
    raise AssertionError(f"still running {engine.running}, cancelled {engine.stats.cancelled}")


def _runs_to_the_end(loaded, prompt: list[int], n: int) -> bool:
    return len(list(generate_tokens(loaded.model, prompt, greedy(loaded, n)))) == n


def test_disconnect_cancels_a_stream(server, loaded):
    url, engine = server
    prompt = loaded.chat_format.build(loaded.tokenizer.encode, HELLO, 10**6, 0)
    assert _runs_to_the_end(loaded, prompt, 200)  # so only a cancellation can end it early
    before = engine.stats.cancelled
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 200, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and '"content":""' not in line:
                    break  # one real token arrived: hang up
    _wait_idle(engine, before)


def test_disconnect_cancels_a_non_streaming_request(server, loaded):
    url, engine = server
    assert _runs_to_the_end(loaded, loaded.tokenizer.encode("hello"), 250)
    before = engine.stats.cancelled
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 250, "temperature": 0}
    with httpx.Client(timeout=httpx.Timeout(10, read=0.05)) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    _wait_idle(engine, before)
