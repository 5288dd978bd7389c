"""The HTTP client, the batch helper, the on-disk cache and `make_client`, against a scripted chat-completions
server on 127.0.0.1 that each test starts itself (bounded in requests and time)."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from autointerp.llm import make_client
from autointerp.llm.base import LLMError, LLMResponse, complete_many
from autointerp.llm.cache import CachedClient, cache_key
from autointerp.llm.openai_compat import OpenAICompatClient, parse_retry_after

MAX_REQUESTS = 100  # a runaway retry loop fails the test instead of hammering the server


@dataclass
class Step:
    """What the server does for one request: status, body (None = a normal reply echoing the prompt), delay."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def reply(content: str, prompt_tokens: int = 10, completion_tokens: int = 5, **usage: Any) -> dict[str, Any]:
    """A chat-completions response body."""
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, **usage}}


class ChatServer:
    """Scripted server state: request i gets script[i] (the last step repeats), or `script(body)` if callable."""

    def __init__(self) -> None:
        self.script: list[Step] | Callable[[dict[str, Any]], Step] = [Step()]
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.stop = threading.Event()  # cuts slow responses short at teardown
        self.lock = threading.Lock()
        self.url = ""

    def begin(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> Step:
        """Count a request and choose its step."""
        with self.lock:
            i = self.requests
            self.requests += 1
            self.paths.append(path)
            self.headers.append(headers)
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if i >= MAX_REQUESTS:
            return Step(400, {"error": {"message": "test server: request budget exhausted"}})
        if callable(self.script):
            return self.script(body)
        return self.script[min(i, len(self.script) - 1)]

    def end(self) -> None:
        """A request finished (answered or abandoned)."""
        with self.lock:
            self.in_flight -= 1


class Handler(BaseHTTPRequestHandler):
    """Speaks just enough of the chat-completions protocol."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do, so the client's pool is exercised

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        chat: ChatServer = self.server.chat  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw)
        step = chat.begin(self.path, dict(self.headers), body)
        try:
            if step.delay:
                chat.stop.wait(step.delay)
            payload = step.body
            if payload is None:
                payload = reply(f"echo: {body['messages'][-1]['content']}")
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(step.status)
            for k, v in step.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up: expected
            self.close_connection = True
        finally:
            chat.end()

    def log_message(self, *args: Any) -> None:
        """Quiet: no access log on stderr."""


@pytest.fixture
def server() -> Iterator[ChatServer]:
    """A fresh scripted server on an ephemeral port, shut down after the test."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    chat = ChatServer()
    httpd.chat = chat  # type: ignore[attr-defined]
    chat.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield chat
    finally:
        chat.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def client(server: ChatServer, **kwargs: Any) -> OpenAICompatClient:
    """A client with test-sized backoff and timeout."""
    opts: dict[str, Any] = {"backoff": 0.001, "max_backoff": 0.01, "timeout": 5.0, "max_retries": 5}
    opts.update(kwargs)
    return OpenAICompatClient(server.url, "test-model", **opts)


def msgs(text: str = "hello") -> list[dict[str, str]]:
    """A two-message chat request."""
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


# ---- the HTTP client --------------------------------------------------------------------------------------------

def test_success_sends_openai_request_and_parses_reply(server: ChatServer) -> None:
    c = client(server, api_key="sk-test")
    resp = c.complete(msgs("hi there"), max_tokens=17, temperature=0.5)
    assert resp == LLMResponse("echo: hi there", 10, 5, 0.0, cached=False)
    assert server.requests == 1
    assert server.paths == ["/v1/chat/completions"]
    assert server.bodies[0] == {"model": "test-model", "messages": msgs("hi there"), "max_tokens": 17,
                                "temperature": 0.5}
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert c.stats.snapshot()["requests"] == 1 and c.stats.retries == 0 and c.stats.failures == 0
    assert "sk-test" not in repr(c)


def test_no_key_sends_no_authorization(server: ChatServer) -> None:
    client(server).complete(msgs())
    assert "Authorization" not in server.headers[0]


def test_429_honours_retry_after_then_succeeds(server: ChatServer) -> None:
    server.script = [Step(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"}), Step()]
    c = client(server, max_backoff=5.0)
    t0 = time.monotonic()
    assert c.complete(msgs()).text == "echo: hello"
    assert time.monotonic() - t0 >= 0.29  # waited as told, not the 1 ms backoff
    assert server.requests == 2 and c.stats.retries == 1 and c.stats.failures == 0


def test_500_then_success(server: ChatServer) -> None:
    server.script = [Step(500, "internal error"), Step(503, "overloaded"), Step()]
    c = client(server)
    assert c.complete(msgs()).text == "echo: hello"
    assert server.requests == 3 and c.stats.retries == 2


def test_persistent_500_fails_after_max_retries(server: ChatServer) -> None:
    server.script = [Step(500, {"error": {"message": "kaput"}})]
    c = client(server, max_retries=3)
    with pytest.raises(LLMError) as info:
        c.complete(msgs())
    assert server.requests == 4  # first attempt + 3 retries
    err = info.value
    assert err.status == 500 and err.model == "test-model" and err.server == server.url
    assert "HTTP 500" in str(err) and "kaput" in str(err) and server.url in str(err) and "test-model" in str(err)
    assert c.stats.snapshot() | {"cost_usd": 0} == {
        "requests": 4, "retries": 3, "failures": 1, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0,
        "cache_hits": 0, "cache_misses": 0}


def test_400_is_not_retried(server: ChatServer) -> None:
    server.script = [Step(400, {"error": {"message": "max_tokens is too large"}})]
    c = client(server)
    with pytest.raises(LLMError, match="HTTP 400.*max_tokens is too large") as info:
        c.complete(msgs())
    assert info.value.status == 400
    assert server.requests == 1 and c.stats.failures == 1


def test_404_hints_at_base_url(server: ChatServer) -> None:
    server.script = [Step(404, "<html>Not Found</html>")]
    with pytest.raises(LLMError, match="HTTP 404.*/v1.*Not Found"):
        client(server).complete(msgs())
    assert server.requests == 1


def test_malformed_json_retried_a_little_then_error(server: ChatServer) -> None:
    server.script = [Step(200, "{not json")]
    c = client(server, max_retries=5, max_malformed_retries=2)
    with pytest.raises(LLMError, match="malformed JSON.*not json"):
        c.complete(msgs())
    assert server.requests == 3  # 1 + 2 malformed retries, well below max_retries


def test_malformed_json_once_is_a_glitch(server: ChatServer) -> None:
    server.script = [Step(200, "{trunc"), Step()]
    assert client(server).complete(msgs()).text == "echo: hello"
    assert server.requests == 2


@pytest.mark.parametrize("body, missing", [
    ({"object": "chat.completion", "usage": {}}, "'choices'"),
    ({"choices": []}, "'choices'"),
    ({"choices": [{"index": 0}]}, "'choices[0].message'"),
    ({"choices": [{"message": {"role": "assistant", "content": None}, "finish_reason": "length"}]},
     "'choices[0].message.content'"),
    ({"error": {"message": "upstream provider down"}}, "upstream provider down"),
    ([1, 2], "not an object"),
])
def test_missing_fields_named(server: ChatServer, body: Any, missing: str) -> None:
    server.script = [Step(200, body)]
    with pytest.raises(LLMError) as info:
        client(server, max_malformed_retries=1).complete(msgs())
    assert missing in str(info.value)
    assert server.requests == 2


def test_content_parts_and_missing_usage(server: ChatServer) -> None:
    server.script = [Step(200, {"choices": [{"message": {"content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}}]})]
    assert client(server).complete(msgs()) == LLMResponse("ab")


def test_slow_response_times_out_retries_then_fails(server: ChatServer) -> None:
    server.script = [Step(delay=3.0)]
    c = client(server, timeout=0.2, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(LLMError, match="timed out"):
        c.complete(msgs())
    assert time.monotonic() - t0 < 2.0
    assert server.requests == 2 and c.stats.retries == 1


def test_slow_once_then_fast(server: ChatServer) -> None:
    server.script = [Step(delay=3.0), Step()]
    assert client(server, timeout=0.2).complete(msgs()).text == "echo: hello"
    assert server.requests == 2


def test_connection_refused_is_retried_then_fails() -> None:
    with socket.socket() as s:  # a port nobody listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = OpenAICompatClient(f"http://127.0.0.1:{port}/v1", "m", backoff=0.001, max_backoff=0.01, max_retries=2,
                           timeout=2.0)
    with pytest.raises(LLMError, match="connection error"):
        c.complete(msgs())
    assert c.stats.requests == 3 and c.stats.failures == 1


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(future) <= 31  # type: ignore[operator]
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_backoff_grows_and_is_capped() -> None:
    c = OpenAICompatClient("http://127.0.0.1:9/v1", "m", backoff=1.0, max_backoff=5.0)
    assert 0.5 <= c._delay(0, None) <= 1.0
    assert 2.0 <= c._delay(2, None) <= 4.0
    assert 2.5 <= c._delay(10, None) <= 5.0
    assert c._delay(0, 3.0) == 3.0 and c._delay(0, 100.0) == 5.0


# ---- accounting --------------------------------------------------------------------------------------------------

def test_token_and_cost_accounting_sums(server: ChatServer) -> None:
    server.script = [Step(200, reply("ok", prompt_tokens=1000, completion_tokens=500))]
    c = client(server, prices={"test-model": (1.0, 2.0)})  # $1 / $2 per 1M tokens
    results = complete_many(c, [msgs(str(i)) for i in range(4)], max_concurrency=2)
    each = (1000 * 1.0 + 500 * 2.0) / 1e6
    assert all(isinstance(r, LLMResponse) and r.cost_usd == pytest.approx(each) for r in results)
    snap = c.stats.snapshot()
    assert snap["prompt_tokens"] == 4000 and snap["completion_tokens"] == 2000 and snap["requests"] == 4
    assert snap["cost_usd"] == pytest.approx(4 * each)


def test_cost_from_known_prices_unknown_model_and_server_reported_cost(server: ChatServer) -> None:
    server.script = [Step(200, reply("ok", prompt_tokens=1_000_000, completion_tokens=1_000_000))]
    known = OpenAICompatClient(server.url, "openai/gpt-4o-mini-2024-07-18", backoff=0.001)
    assert known.complete(msgs()).cost_usd == pytest.approx(0.15 + 0.60)
    assert client(server).complete(msgs()).cost_usd == 0.0  # unknown price: zero, not a guess
    server.script = [Step(200, reply("ok", cost=0.0042))]  # OpenRouter's usage.cost wins over the table
    assert known.complete(msgs()).cost_usd == pytest.approx(0.0042)


# ---- complete_many -----------------------------------------------------------------------------------------------

def test_concurrency_bound_and_order(server: ChatServer) -> None:
    server.script = [Step(delay=0.15)]
    c = client(server)
    results = complete_many(c, [msgs(f"q{i}") for i in range(12)], max_concurrency=3)
    assert [r.text for r in results] == [f"echo: q{i}" for i in range(12)]  # type: ignore[union-attr]
    assert server.requests == 12
    assert 2 <= server.max_in_flight <= 3  # really concurrent, never above the bound


def test_complete_many_returns_failures_in_place(server: ChatServer) -> None:
    def script(body: dict[str, Any]) -> Step:
        return Step(400, {"error": {"message": "nope"}}) if body["messages"][-1]["content"] == "bad" else Step()

    server.script = script
    results = complete_many(client(server), [msgs("a"), msgs("bad"), msgs("c")], max_concurrency=2, progress=True)
    assert isinstance(results[0], LLMResponse) and results[0].text == "echo: a"
    assert isinstance(results[1], LLMError) and results[1].status == 400
    assert isinstance(results[2], LLMResponse) and results[2].text == "echo: c"
    assert complete_many(client(server), []) == []


def test_complete_many_wraps_unexpected_exceptions() -> None:
    class Broken:
        name = "broken"

        def complete(self, messages: list[dict[str, str]], *, max_tokens: int = 256,
                     temperature: float = 0.0) -> LLMResponse:
            if messages[-1]["content"] == "boom":
                raise KeyError("oops")
            return LLMResponse("fine")

    for conc in (1, 4):
        results = complete_many(Broken(), [msgs("boom"), msgs("x")], max_concurrency=conc)
        assert isinstance(results[0], LLMError) and "KeyError" in str(results[0])
        assert isinstance(results[0].__cause__, KeyError)
        assert results[1] == LLMResponse("fine")
    with pytest.raises(ValueError):
        complete_many(Broken(), [msgs()], max_concurrency=0)


# ---- the cache ---------------------------------------------------------------------------------------------------

def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.json"))


def test_cache_second_run_issues_no_requests(server: ChatServer, tmp_path: Path) -> None:
    requests = [msgs(f"q{i}") for i in range(5)]
    first = complete_many(CachedClient(client(server), tmp_path), requests, max_concurrency=3)
    assert server.requests == 5 and len(_entries(tmp_path)) == 5
    assert not any(r.cached for r in first)  # type: ignore[union-attr]
    cached = CachedClient(client(server), tmp_path)  # a new process would start like this
    second = complete_many(cached, requests, max_concurrency=3)
    assert server.requests == 5  # zero new requests
    assert all(r.cached for r in second)  # type: ignore[union-attr]
    assert [r.text for r in second] == [r.text for r in first]  # type: ignore[union-attr]
    assert [(r.prompt_tokens, r.completion_tokens) for r in second] == [(10, 5)] * 5  # type: ignore[union-attr]
    assert cached.stats.cache_hits == 5 and cached.stats.cache_misses == 0
    assert cached.name == cached.inner.name


def test_cache_key_covers_name_messages_and_settings(server: ChatServer, tmp_path: Path) -> None:
    c = CachedClient(client(server), tmp_path)
    c.complete(msgs(), max_tokens=10)
    c.complete(msgs(), max_tokens=11)
    c.complete(msgs(), max_tokens=10, temperature=0.7)
    c.complete(msgs("other"), max_tokens=10)
    c.complete(msgs(), max_tokens=10)  # the only repeat
    assert server.requests == 4
    key = cache_key("a", msgs(), 10, 0.0)
    assert key != cache_key("b", msgs(), 10, 0.0)
    assert key == cache_key("a", [dict(reversed(m.items())) for m in msgs()], 10, 0)  # canonical: order, int/float


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong_key"])
def test_corrupt_cache_entry_is_requested_again(server: ChatServer, tmp_path: Path, damage: str) -> None:
    CachedClient(client(server), tmp_path).complete(msgs())
    (entry,) = _entries(tmp_path)
    text = entry.read_text()
    entry.write_text({"truncate": text[: len(text) // 2], "garbage": "\x00\x01",
                      "empty": "", "wrong_key": text.replace('"key": "', '"key": "0')}[damage])
    c = CachedClient(client(server), tmp_path)
    resp = c.complete(msgs())
    assert server.requests == 2 and not resp.cached and resp.text == "echo: hello"
    assert c.complete(msgs()).cached  # repaired
    assert server.requests == 2


def test_failures_are_not_cached(server: ChatServer, tmp_path: Path) -> None:
    server.script = [Step(400, "bad"), Step()]
    c = CachedClient(client(server), tmp_path)
    with pytest.raises(LLMError):
        c.complete(msgs())
    assert _entries(tmp_path) == [] and c.stats.failures == 1
    assert c.complete(msgs()).text == "echo: hello"  # asked again, now succeeds and is stored
    assert server.requests == 2 and len(_entries(tmp_path)) == 1


def test_concurrent_identical_requests_do_not_corrupt(server: ChatServer, tmp_path: Path) -> None:
    server.script = [Step(delay=0.05)]
    c = CachedClient(client(server), tmp_path)
    results = complete_many(c, [msgs("same")] * 8 + [msgs("other")] * 4, max_concurrency=6)
    assert all(isinstance(r, LLMResponse) for r in results)
    entries = _entries(tmp_path)
    assert len(entries) == 2 and all(json.loads(p.read_text())["response"]["text"].startswith("echo") for p in entries)
    assert not list(tmp_path.rglob("*.tmp"))  # no temp files left behind
    before = server.requests
    assert all(r.cached for r in complete_many(c, [msgs("same"), msgs("other")]))  # type: ignore[union-attr]
    assert server.requests == before


def test_interrupted_write_leaves_no_entry(server: ChatServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = CachedClient(client(server), tmp_path)

    def die(*args: Any) -> None:
        raise KeyboardInterrupt  # as if the run were stopped between writing and renaming

    monkeypatch.setattr("autointerp.llm.cache.os.replace", die)
    with pytest.raises(KeyboardInterrupt):
        c.complete(msgs())
    monkeypatch.undo()
    assert _entries(tmp_path) == [] and not list(tmp_path.rglob("*.tmp"))
    assert not c.complete(msgs()).cached


# ---- make_client ---------------------------------------------------------------------------------------------------

def test_make_client_specs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-o")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-r")
    monkeypatch.delenv("SAE_KIT_API_KEY", raising=False)
    c = make_client("openai:gpt-4o-mini")
    assert isinstance(c, OpenAICompatClient)
    assert (c.name, c.base_url, c.model) == ("openai:gpt-4o-mini", "https://api.openai.com/v1", "gpt-4o-mini")
    assert c.max_tokens_field == "max_completion_tokens"
    c = make_client("openrouter:meta-llama/llama-3.1-8b-instruct:free")
    assert c.base_url == "https://openrouter.ai/api/v1" and c.model == "meta-llama/llama-3.1-8b-instruct:free"
    c = make_client("http://localhost:11434/v1:llama3.1:8b")
    assert (c.base_url, c.model, c.name) == ("http://localhost:11434/v1", "llama3.1:8b",
                                             "http://localhost:11434/v1:llama3.1:8b")
    c = make_client("https://llm.example.org/v1:Qwen/Qwen2.5-7B-Instruct", timeout=3)
    assert (c.base_url, c.model, c.timeout) == ("https://llm.example.org/v1", "Qwen/Qwen2.5-7B-Instruct", 3)
    cached = make_client("openai:gpt-4o", cache_dir=str(tmp_path / "cache"))
    assert isinstance(cached, CachedClient) and cached.name == "openai:gpt-4o" and (tmp_path / "cache").is_dir()


def test_make_client_rejects_bad_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        make_client("openai:gpt-4o-mini")
    for spec, pattern in [("offline", "baseline"), ("gpt-4o", "unknown LLM spec"), ("openrouter:", "no model"),
                          ("http://localhost:8000/v1", "BASE_URL:MODEL"), ("local:", "no model")]:
        with pytest.raises(ValueError, match=pattern):
            make_client(spec, api_key="k")


def test_make_client_end_to_end_with_cache(server: ChatServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_KIT_API_KEY", "sk-local")
    c = make_client(f"{server.url}:my-model", cache_dir=str(tmp_path), backoff=0.001)
    assert c.complete(msgs()).text == "echo: hello"
    assert server.bodies[0]["model"] == "my-model" and server.headers[0]["Authorization"] == "Bearer sk-local"
    assert c.complete(msgs()).cached and server.requests == 1


# ---- the reachability check ------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,refused", [(200, False), (404, False), (401, True), (403, True)])
def test_endpoint_check_reports_a_refused_api_key(monkeypatch: pytest.MonkeyPatch, status: int, refused: bool) -> None:
    from autointerp.llm.check import endpoint_problem

    seen: list[str | None] = []

    class Models(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(self.headers.get("Authorization"))
            data = json.dumps({"data": [{"id": "m"}]} if status == 200 else {"error": {"message": "no"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("SAE_KIT_API_KEY", "wrong-key")
    try:
        problem = endpoint_problem(f"http://127.0.0.1:{httpd.server_address[1]}/v1:m")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen == ["Bearer wrong-key"]  # the check asked /models with the run's key
    if refused:
        assert problem is not None and f"HTTP {status}" in problem and "API key" in problem
    else:
        assert problem is None
