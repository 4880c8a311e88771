"""The server's doors (app.py): the Host check, the API key and the body limit answer before the body is read;
an empty key is refused; a server exposed without a key warns; text that is not valid Unicode is a 400; prompts
are tokenized off the event loop; the chat page keeps the key for the tab only."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from baichuan.serve.app import allowed_hosts_for, create_app, exposure_warning, run  # noqa: E402
from tests.serve import running_server, tiny_checkpoint  # noqa: E402

MODEL = "tiny"
HELLO = [{"role": "user", "content": "你好, hello"}]
KEY = "s3cret"
LIMIT = 4096
HOST = "127.0.0.1:8000"
SENT = {"host": HOST, "authorization": f"Bearer {KEY}", "content-type": "application/json"}


def assert_openai_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def guarded(loaded):
    """Every door shut, as `run` shuts them for a server on 127.0.0.1 with a key."""
    return create_app(
        loaded,
        model_name=MODEL,
        api_key=KEY,
        max_request_bytes=LIMIT,
        allowed_hosts=allowed_hosts_for("127.0.0.1"),
        max_batch=2,
    )


def call_asgi(app, headers: dict[str, str], chunks: list[bytes], path: str = "/v1/chat/completions"):
    """One POST straight into the ASGI app, its body in `chunks` (no TestClient, which reads a body whole
    before the app sees it): the status, the JSON answer, and how many chunks the app pulled."""
    pulled = 0
    messages = []

    async def receive():
        nonlocal pulled
        if pulled == len(chunks):
            return {"type": "http.disconnect"}
        pulled += 1
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message):
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, httpx.Response(status, content=body).json(), pulled


# --- the body limit, the key and the Host: answered before the body is read ------------------------------------

MEGABYTE_IN_KB = [b"x" * 1000] * 1000


@pytest.mark.parametrize(
    "headers,status,code",
    [
        ({**SENT, "content-length": str(10**9)}, 413, "request_too_large"),
        ({**SENT, "content-length": "12abc"}, 400, None),
        ({**SENT, "authorization": "", "content-length": str(10**6)}, 401, "invalid_api_key"),
        ({**SENT, "authorization": f"Basic {KEY}", "content-length": str(10**6)}, 401, "invalid_api_key"),
        ({**SENT, "host": "rebound.example", "content-length": str(10**6)}, 400, "invalid_host"),
    ],
    ids=["declared oversize", "bad length", "no key", "not bearer", "foreign host"],
)
def test_the_doors_answer_without_reading_the_body(guarded, headers, status, code):
    answer, error, pulled = call_asgi(guarded, headers, MEGABYTE_IN_KB)
    assert (answer, error["error"]["code"], pulled) == (status, code, 0)


def test_a_streamed_oversize_body_is_cut_at_the_limit(guarded):
    """Chunked, with no Content-Length: reading stops at the first chunk past the limit."""
    status, error, pulled = call_asgi(guarded, SENT, MEGABYTE_IN_KB)
    assert (status, error["error"]["code"]) == (413, "request_too_large")
    assert pulled == LIMIT // 1000 + 1


def test_requests_within_the_doors_are_answered(guarded):
    with TestClient(guarded, base_url=f"http://{HOST}") as client:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "user": "u" * (LIMIT - 200)}
        assert client.post("/v1/chat/completions", json=body, headers=SENT).status_code == 200
        too_large = client.post("/v1/chat/completions", json=body | {"user": "u" * LIMIT}, headers=SENT)
        assert_openai_error(too_large, 413, "request_too_large")
        # The key guards every path but the page, /health and the schema: an unknown /v1 path is a 401 too.
        assert_openai_error(client.get("/v1/nothing"), 401, "invalid_api_key")
        assert client.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
        for public in ("/", "/health", "/openapi.json", "/docs"):
            assert client.get(public).status_code == 200, public


@pytest.mark.parametrize("host", [HOST, "127.0.0.1", "localhost:8000", "LOCALHOST", "[::1]:8000"])
def test_loopback_names_are_answered(guarded, host):
    with TestClient(guarded, base_url=f"http://{HOST}") as client:
        assert client.get("/health", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["rebound.example", "127.0.0.1.rebound.example:8000", "localhost.example"])
def test_a_dns_rebinding_page_is_refused(guarded, host):
    """The page's own name arrives as Host, whatever address it resolved to: refused on every path, the page
    included (no key is needed to read it)."""
    with TestClient(guarded, base_url=f"http://{HOST}") as client:
        for path in ("/", "/health", "/v1/models"):
            assert_openai_error(client.get(path, headers={"host": host}), 400, "invalid_host")


def test_the_names_run_answers_to():
    loopback = ["localhost", "127.0.0.1", "::1"]
    assert allowed_hosts_for("127.0.0.1") == loopback
    assert allowed_hosts_for("localhost") == loopback
    assert allowed_hosts_for("192.168.1.5") == loopback + ["192.168.1.5"]
    assert allowed_hosts_for("127.0.0.1", ["api.example", "Box.LAN:8000"]) == loopback + [
        "api.example",
        "box.lan",
    ]
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("::") is None  # its names are unknown
    assert allowed_hosts_for("0.0.0.0", ["api.example"]) == loopback + ["api.example"]
    assert allowed_hosts_for("127.0.0.1", ["*"]) is None


def test_uvicorn_answers_oversize_bodies_and_keeps_serving(guarded):
    """Through a real uvicorn: a declared oversize body gets its 413 with only the headers sent, a chunked one
    as soon as it passes the limit, and the server goes on answering."""
    with running_server(guarded) as url:
        address = urlsplit(url)
        start = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address.netloc}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        )
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(f"{start}Content-Length: {10**9}\r\n\r\n".encode())
            assert read_status(sock) == 413
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(f"{start}Transfer-Encoding: chunked\r\n\r\n".encode())
            sent = 0
            for _ in range(100):  # 100 KB at most; the answer comes after LIMIT
                try:
                    sock.sendall(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
                except OSError:  # the server answered and closed
                    break
                sent += 1000
                if answered(sock):
                    break
            assert read_status(sock) == 413 and sent <= LIMIT + 2000
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def answered(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0.02)[0])


def read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


# --- the key: never silently empty; a server exposed without one warns -----------------------------------------


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_an_error_not_an_open_server(loaded, tmp_path_factory, monkeypatch, key):
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(loaded, model_name=MODEL, api_key=key)
    typer_testing = pytest.importorskip("typer.testing")
    from baichuan import cli

    served = []
    monkeypatch.setattr("baichuan.serve.app.run", lambda *args, **kwargs: served.append(kwargs))
    model = str(tiny_checkpoint(tmp_path_factory))
    runner = typer_testing.CliRunner()
    given = runner.invoke(cli.app, ["serve", "--model", model, "--api-key", key])
    monkeypatch.setenv("BAICHUAN_API_KEY", key)  # click alone would read "" as unset
    from_env = runner.invoke(cli.app, ["serve", "--model", model])
    for result in (given, from_env):
        assert result.exit_code == 1 and "API key is empty" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    assert not served


def test_serving_beyond_loopback_without_a_key_warns(tmp_path_factory, monkeypatch, capsys):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, None) is None
    assert exposure_warning("0.0.0.0", KEY) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "box.lan"):
        assert exposure_warning(host, None).startswith(f"WARNING: serving on {host} without an API key")
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    run(tiny_checkpoint(tmp_path_factory), host="0.0.0.0", device="cpu", dtype="fp32")
    lines = capsys.readouterr().err.splitlines()
    # Progress line by line (captured here, so not a terminal), then the warning last, where it is seen.
    assert lines[0].startswith("loading ") and lines[1].startswith("loaded in ")
    assert lines[2].startswith("serving ") and "no API key" in lines[2]
    assert lines[-1] == exposure_warning("0.0.0.0", None)


# --- text: lone surrogates are a 400 ---------------------------------------------------------------------------

# Raw JSON bodies: `\ud800` is what a JSON encoder writes for a lone surrogate in a string.
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ASK = '"model": "tiny", "messages": [{"role": "user", "content": "a"}]'
SURROGATES = {
    "chat content": (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    "text part": (
        CHAT,
        '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
    ),
    "name": (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "a", "name": "\\ud800"}]}'),
    "stop": (CHAT, "{" + ASK + ', "stop": ["\\ud800"]}'),
    "logit_bias key": (CHAT, "{" + ASK + ', "logit_bias": {"\\ud800": "x"}}'),
    "user": (CHAT, "{" + ASK + ', "user": "\\ud800"}'),
    "model": (COMPLETIONS, '{"model": "\\ud83d", "prompt": "a"}'),
    "prompt": (COMPLETIONS, '{"model": "tiny", "prompt": "\\udc00 hello"}'),
    "prompt list": (COMPLETIONS, '{"model": "tiny", "prompt": ["\\udc00"]}'),
}


@pytest.mark.parametrize("path,raw", SURROGATES.values(), ids=SURROGATES.keys())
def test_a_lone_surrogate_is_a_400(guarded, path, raw):
    with TestClient(guarded, base_url=f"http://{HOST}") as client:
        assert_openai_error(client.post(path, content=raw, headers=SENT), 400)


# --- the event loop: prompts are tokenized in a worker thread --------------------------------------------------


class SlowTokenizer:
    """The checkpoint's tokenizer, recording whether encode ran on the event loop; "slow" takes 3 s."""

    def __init__(self, inner):
        self.inner, self.on_loop, self.started = inner, [], threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text: str) -> list[int]:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        if "slow" in text:
            self.started.set()
            time.sleep(3)  # as a long prompt would (SentencePiece releases the GIL, as sleep does)
        return self.inner.encode(text)


def test_prompts_are_tokenized_off_the_event_loop(loaded):
    app = create_app(loaded, model_name=MODEL, max_batch=2)
    tokenizer = app.state.serving.tokenizer = SlowTokenizer(loaded.tokenizer)
    with TestClient(app) as client:
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 1})
        body = {"model": MODEL, "prompt": "slow", "max_tokens": 1}
        slow = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": body})
        slow.start()
        assert tokenizer.started.wait(30)
        start = time.monotonic()
        assert client.get("/health").status_code == 200
        waited = time.monotonic() - start
        slow.join(30)
    assert tokenizer.on_loop and not any(tokenizer.on_loop)
    assert waited < 1.5  # on the loop, /health would have waited out the 3 s


# --- the chat page ----------------------------------------------------------------------------------------------


def test_the_chat_page_keeps_the_key_for_the_tab_only(guarded):
    with TestClient(guarded, base_url=f"http://{HOST}") as client:
        page = client.get("/").text
    assert 'id === "api_key" ? sessionStorage : localStorage' in page
    assert 'localStorage.removeItem("baichuan.api_key")' in page  # a key an older page saved is deleted
    assert "sessionStorage" in page.split("<script>")[0]  # and the page says where the key is kept
