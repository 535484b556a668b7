"""Tests for tgw, in the order of tgw.py's sections.

Every test that involves HTTP starts the real gateway on 127.0.0.1 port 0 (in a thread with
its own event loop) and talks to it over real sockets; upstreams are scripted fake servers
on 127.0.0.1. Nothing here touches the internet, and every server stops when its test ends.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.client
import json
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import tgw

HERE = Path(__file__).resolve().parent
TGW = str(HERE / "tgw.py")


# ======================================================================================
# Harness: the gateway in a thread, scripted upstreams, raw HTTP helpers
# ======================================================================================


class RunningGateway:
    """tgw.serve() on its own event loop in a background thread."""

    def __init__(self, cfg: tgw.Config):
        self.cfg = cfg
        self.port = 0
        self.gateway: tgw.Gateway | None = None
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("gateway did not start")
        if self.error:
            raise self.error

    def _run(self):
        asyncio.set_event_loop(self.loop)

        def on_ready(port, gateway):
            self.port, self.gateway = port, gateway
            self.ready.set()

        async def main():
            self.stop_event = asyncio.Event()
            await tgw.serve(self.cfg, ready=on_ready, stop=self.stop_event)

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # surfaced to the test
            self.error = exc
            self.ready.set()
        finally:
            self.loop.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        if self.thread.is_alive() and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(30)

    def rows(self, at_least: int = 1) -> list[dict]:
        """Ledger rows written so far. A row is queued just after its response is sent, so
        wait (bounded) until `at_least` rows are there and the writer has caught up."""
        deadline = time.monotonic() + 10
        while True:
            self.gateway.ledger.flush()
            db = sqlite3.connect(self.gateway.ledger.path)
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM requests ORDER BY id")]
            db.close()
            if len(rows) >= at_least or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)


def make_config(tmp_path: Path, env: dict | None = None, **overrides) -> tgw.Config:
    values = {"facade_port": 0, "ledger_path": str(tmp_path / "ledger.db"), "log_level": "warning"}
    values.update({k: v for k, v in overrides.items()})
    return tgw.load_config(None, {k: str(v) if not isinstance(v, str) else v for k, v in values.items()}, env=env or {})


@pytest.fixture
def start_gateway(tmp_path):
    started = []

    def start(env=None, **overrides) -> RunningGateway:
        gw = RunningGateway(make_config(tmp_path, env, **overrides))
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


class FakeUpstream:
    """A scripted upstream on 127.0.0.1. `script(handler, body)` answers each request;
    every request is recorded (method, path, headers, body)."""

    def __init__(self, script):
        self.requests: list[dict] = []
        self.connections = 0
        self.script = script
        self.disconnects = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                upstream.connections += 1

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                upstream.requests.append(
                    {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body}
                )
                try:
                    upstream.script(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    upstream.disconnects += 1

            do_GET = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    made = []

    def make(script) -> FakeUpstream:
        up = FakeUpstream(script)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


def reply_json(h, obj, status=200, headers=None):
    data = json.dumps(obj).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


def reply_sse(h, events, delay=0.0, drop_after=None, terminate=True):
    """Stream SSE `events` (dicts or raw strings) chunked; optionally drop the connection."""
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    for i, ev in enumerate(events):
        if drop_after is not None and i == drop_after:
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        text = ev if isinstance(ev, str) else "data: " + json.dumps(ev) + "\n\n"
        data = text.encode()
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.flush()
        if delay:
            time.sleep(delay)
    if terminate:
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()


def chat_completion(content="Hi from upstream", prompt=11, completion=7, model="gpt-4o-mini", cached=0):
    return {
        "id": "chatcmpl-up1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }  # fmt: skip


def chat_chunks(words=("Hel", "lo"), prompt=9, completion=2, with_usage=True):
    base = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    out = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    out += [dict(base, choices=[{"index": 0, "delta": {"content": w}, "finish_reason": None}]) for w in words]
    out.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if with_usage:
        out.append(
            dict(
                base,
                choices=[],
                usage={"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            )
        )
    out.append("data: [DONE]\n\n")
    return out


def post(gw: RunningGateway, path: str, body, headers=None, timeout=10) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), payload


def get(gw: RunningGateway, path: str, headers=None, method="GET") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), payload


def sse_data(payload: bytes) -> list:
    """The data: payloads of an SSE body, JSON-decoded where possible."""
    out = []
    for block in payload.decode().split("\n\n"):
        lines = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
        if lines:
            text = "\n".join(lines)
            out.append(text if text == "[DONE]" else json.loads(text))
    return out


def raw_exchange(port: int, data: bytes, read_until_close=True, timeout=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_until_close:
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def openai_env(up: FakeUpstream, key="sk-upstream-secret-123456") -> dict:
    return {"TOKLIGENCE_OPENAI_BASE_URL": up.url + "/v1", "TOKLIGENCE_OPENAI_API_KEY": key}


def assert_serving(gw: RunningGateway):
    status, _, body = get(gw, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


# ======================================================================================
# 1. Project files and utilities
# ======================================================================================


def test_pyproject_installs_tgw_command_without_dependencies():
    text = (HERE / "pyproject.toml").read_text()
    assert 'tgw = "tgw:main"' in text
    assert "dependencies = []" in text


def test_example_config_lists_every_key_with_its_default():
    text = (HERE / "gateway.ini.example").read_text()
    assert text == tgw.write_example_config() + "\n" or text == tgw.write_example_config()
    for key in tgw.CONFIG_KEYS:
        assert f"\n{key} = " in text


def test_cli_runs_without_installing():
    out = subprocess.run([sys.executable, TGW, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"tgw {tgw.__version__}"


def test_estimate_tokens_counts_every_string_and_images():
    small = tgw.estimate_tokens({"messages": [{"role": "user", "content": "hello"}]})
    with_tools = tgw.estimate_tokens(
        {"messages": [{"role": "user", "content": "hello"}], "tools": [{"name": "x" * 400}]}
    )
    with_image = tgw.estimate_tokens({"content": [{"type": "image", "source": {"data": "AAAA"}}]})
    assert 0 < small < with_tools
    assert with_image >= 1600


def test_field_types_are_checked_with_the_field_named():
    with pytest.raises(tgw.GatewayError) as err:
        tgw.field_of({"max_tokens": "ten"}, "max_tokens", int)
    assert err.value.status == 400 and "'max_tokens' must be an integer" in err.value.message
    assert tgw.field_of({"temperature": 1}, "temperature", float) == 1
    with pytest.raises(tgw.GatewayError):
        tgw.field_of({"stream": 1}, "stream", bool)


# ======================================================================================
# 2. Config
# ======================================================================================


def test_config_precedence_defaults_ini_env_flags(tmp_path):
    ini = tmp_path / "gateway.ini"
    ini.write_text("# comment\nwork_mode = translation\nfacade_port = 9001\nlog_level = debug\n")
    cfg = tgw.load_config(str(ini), {}, env={})
    assert (cfg.work_mode, cfg.facade_port, cfg.log_level, cfg.host) == ("translation", 9001, "debug", "127.0.0.1")
    cfg = tgw.load_config(str(ini), {}, env={"TOKLIGENCE_FACADE_PORT": "9002", "TOKLIGENCE_WORK_MODE": "auto"})
    assert (cfg.work_mode, cfg.facade_port) == ("auto", 9002)
    assert cfg.sources["facade_port"] == "environment" and cfg.sources["log_level"] == str(ini)
    cfg = tgw.load_config(str(ini), {"facade_port": 9003}, env={"TOKLIGENCE_FACADE_PORT": "9002"})
    assert cfg.facade_port == 9003 and cfg.sources["facade_port"] == "command line"


def test_config_file_found_via_environment_variable(tmp_path, monkeypatch):
    ini = tmp_path / "custom.ini"
    ini.write_text("facade_port = 9100\n")
    cfg = tgw.load_config(None, {}, env={"TOKLIGENCE_CONFIG": str(ini)})
    assert cfg.facade_port == 9100 or cfg.path is None  # TOKLIGENCE_CONFIG is read from os.environ
    monkeypatch.setenv("TOKLIGENCE_CONFIG", str(ini))
    assert tgw.load_config(None, {}, env={}).facade_port == 9100


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("work_mode", "fast", ["work_mode", "auto, passthrough, translation"]),
        ("facade_port", "eighty", ["facade_port", "whole number"]),
        ("log_level", "loud", ["log_level", "debug, info, warning, error"]),
        ("openai_base_url", "api.openai.com", ["openai_base_url", "http://"]),
        ("model_provider_routes", "gpt*->openai", ["model_provider_routes", "pattern=>target"]),
        ("idle_timeout", "5", ["idle_timeout", "at least 120"]),
    ],
)
def test_invalid_config_value_names_key_and_accepted_values(key, value, words):
    with pytest.raises(tgw.ConfigError) as err:
        tgw.load_config(None, {}, env={f"TOKLIGENCE_{key.upper()}": value})
    for word in words:
        assert word in str(err.value)


def test_invalid_config_stops_startup_with_a_message(tmp_path):
    env = dict(os.environ, TOKLIGENCE_WORK_MODE="sideways", HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, TGW, "serve", "--port", "0"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30
    )
    assert out.returncode == 2
    assert "work_mode" in out.stderr and "auto, passthrough, translation" in out.stderr


def test_named_providers_and_routes(tmp_path):
    ini = tmp_path / "gateway.ini"
    ini.write_text(
        "model_provider_routes = claude*=>anthropic, qwen*=>ollama\n"
        "model_aliases = fast=>llama3.2\n"
        "[provider.ollama]\ntype = openai\nbase_url = http://127.0.0.1:11434/v1\nmodels = llama3*\n"
        "[provider.azure1]\ntype = azure\nbase_url = https://x.openai.azure.com\napi_key = k\napi_version = 2024-10-21\n"
    )
    cfg = tgw.load_config(str(ini), {}, env={})
    router = tgw.Router(cfg, tgw.build_providers(cfg))
    assert router.resolve("llama3.2").provider.name == "ollama"
    assert router.resolve("qwen2.5").provider.name == "ollama"
    route = router.resolve("fast")
    assert (route.provider.name, route.model, route.requested) == ("ollama", "llama3.2", "fast")
    with pytest.raises(tgw.GatewayError) as err:
        router.resolve("claude-sonnet-4-5")
    assert "anthropic_api_key" in err.value.message and "TOKLIGENCE_ANTHROPIC_API_KEY" in err.value.message
    with pytest.raises(tgw.GatewayError) as err:
        router.resolve("mystery-model")
    assert err.value.status == 404 and "matches no route" in err.value.message
    azure = tgw.build_providers(cfg)["azure1"]
    assert (
        azure.url("chat", "gpt4o")
        == "https://x.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"
    )
    assert azure.auth_headers()["api-key"] == "k"


def test_routes_first_match_wins_in_order(tmp_path):
    env = {"TOKLIGENCE_MODEL_PROVIDER_ROUTES": "gpt-4o*=>anthropic,gpt*=>openai", "TOKLIGENCE_OPENAI_API_KEY": "a",
           "TOKLIGENCE_ANTHROPIC_API_KEY": "b"}  # fmt: skip
    cfg = tgw.load_config(None, {}, env=env)
    router = tgw.Router(cfg, tgw.build_providers(cfg))
    assert router.resolve("gpt-4o-mini").provider.name == "anthropic"
    assert router.resolve("gpt-5").provider.name == "openai"


def test_no_provider_configured_routes_everything_to_loopback():
    cfg = tgw.load_config(None, {}, env={})
    router = tgw.Router(cfg, tgw.build_providers(cfg))
    assert router.offline
    assert router.resolve("gpt-4o").provider.name == "loopback"
    assert router.resolve("claude-opus-4").provider.name == "loopback"


def test_config_cli_set_keeps_comments_and_masks_secrets(tmp_path):
    ini = tmp_path / "gateway.ini"
    ini.write_text(
        "# my gateway\nwork_mode = auto  \n\n[provider.local]\n# local server\nbase_url = http://127.0.0.1:8000/v1\n"
    )

    def run(*args):
        return subprocess.run(
            [sys.executable, TGW, "config", "--config", str(ini), *args], capture_output=True, text=True, timeout=30
        )

    assert run("set", "openai_api_key", "sk-verysecretvalue123").returncode == 0
    assert run("set", "work_mode", "translation").returncode == 0
    text = ini.read_text()
    assert "# my gateway" in text and "# local server" in text
    assert "work_mode = translation" in text and "openai_api_key = sk-verysecretvalue123" in text
    assert text.index("openai_api_key") < text.index("[provider.local]")
    listed = run("list").stdout
    assert "sk-verysecretvalue123" not in listed and "openai_api_key = sk-v…23" in listed
    assert run("get", "work_mode").stdout.strip() == "translation"
    bad = run("set", "work_mode", "sideways")
    assert bad.returncode == 2 and "auto, passthrough, translation" in bad.stderr


# ======================================================================================
# 3. HTTP/1.1 wire
# ======================================================================================


def test_keep_alive_serves_several_requests_on_one_connection(start_gateway):
    gw = start_gateway()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    for i in range(3):
        conn.request(
            "POST", "/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "user", "content": f"n{i}"}]})
        )
        resp = conn.getresponse()
        assert resp.status == 200 and f"n{i}" in json.loads(resp.read())["choices"][0]["message"]["content"]
    conn.close()


def test_pipelined_requests_are_answered_in_order(start_gateway):
    gw = start_gateway()
    requests = b""
    for i in range(3):
        body = json.dumps({**CHAT, "messages": [{"role": "user", "content": f"pipe{i}"}]}).encode()
        requests += b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    requests += b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = raw_exchange(gw.port, requests)
    assert data.count(b"HTTP/1.1 200 OK") == 4
    positions = [data.index(f"pipe{i}".encode()) for i in range(3)]
    assert positions == sorted(positions) and data.rindex(b'"status":"ok"') > positions[-1]


def test_chunked_request_body_and_expect_continue(start_gateway):
    gw = start_gateway()
    body = json.dumps(CHAT).encode()
    chunked = (
        b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 10]), body[i : i + 10]) for i in range(0, len(body), 10))
        + b"0\r\n\r\n"
    )
    data = raw_exchange(
        gw.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + chunked,
    )
    assert data.startswith(b"HTTP/1.1 200") and b"You said: hello" in data
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    assert b"HTTP/1.1 200" in rest and b"You said: hello" in rest


def test_head_root_is_answered_without_a_body(start_gateway):
    gw = start_gateway()
    data = raw_exchange(gw.port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head and body == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /health HTTP/9.9\r\n\r\n", 505),
        (b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n", 400),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
    ],
)
def test_broken_http_gets_a_clear_error_and_the_gateway_keeps_serving(start_gateway, request_bytes, status):
    gw = start_gateway()
    data = raw_exchange(gw.port, request_bytes)
    assert data.startswith(b"HTTP/1.1 %d" % status)
    assert b'"error"' in data
    assert_serving(gw)


def test_oversized_body_gets_413_and_huge_head_gets_431(start_gateway):
    gw = start_gateway(max_body_bytes=1000, max_header_bytes=4096)
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    data = raw_exchange(
        gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert data.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 1000 bytes" in data
    data = raw_exchange(gw.port, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 431")
    assert_serving(gw)


def test_truncated_body_does_not_break_the_gateway(start_gateway):
    gw = start_gateway()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 500\r\n\r\n{"model":')
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""  # nobody left to answer: closed without a response
    assert_serving(gw)


def test_slow_client_gets_408_and_idle_client_is_closed(start_gateway):
    gw = start_gateway(header_timeout=0.5)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        started = time.monotonic()
        data = s.recv(1000)
        assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        assert s.recv(100) == b""  # sent nothing at all: closed after header_timeout
    assert_serving(gw)


def test_unknown_path_is_json_404_and_wrong_method_is_405(start_gateway):
    gw = start_gateway()
    status, headers, body = get(gw, "/v2/nothing")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]["type"] == "not_found_error"
    status, _, body = get(gw, "/v1/chat/completions")
    assert status == 405 and "use POST" in json.loads(body)["error"]["message"]


def test_sse_parser_handles_crlf_multiline_comments_and_split_utf8():
    parser = tgw.SSEParser()
    payload = ': comment\r\nevent: message_start\r\ndata: {"a":\r\ndata: "é€"}\r\n\r\ndata: second\n\n'.encode()
    events = []
    for i in range(len(payload)):  # one byte at a time: splits CRLF pairs and UTF-8 sequences
        events += parser.feed(payload[i : i + 1])
    assert [(e.event, e.data) for e in events] == [("message_start", '{"a":\n"é€"}'), ("", "second")]
    assert json.loads(events[0].data) == {"a": "é€"}
    parser.feed(b"data: tail")
    assert [e.data for e in parser.finish()] == ["tail"]


def test_proxy_environment_is_honoured():
    env = {"HTTPS_PROXY": "http://user:pw@proxy.local:3128", "NO_PROXY": "localhost,.internal"}
    host, port, auth = tgw.proxy_for("https", "api.openai.com", env)
    assert (host, port) == ("proxy.local", 3128) and auth == "Basic " + base64.b64encode(b"user:pw").decode()
    assert tgw.proxy_for("https", "llm.internal", env) is None
    assert tgw.proxy_for("http", "api.openai.com", env) is None


def test_http_proxy_gets_absolute_form_request(start_gateway, upstream, monkeypatch):
    seen = []

    def proxy_script(h, body):
        seen.append(h.path)
        reply_json(h, chat_completion("via proxy"))

    proxy = upstream(proxy_script)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "")
    gw = start_gateway(
        env={"TOKLIGENCE_OPENAI_BASE_URL": "http://llm.example.test/v1", "TOKLIGENCE_OPENAI_API_KEY": "k"}
    )
    status, _, body = post(gw, "/v1/chat/completions", CHAT)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "via proxy"
    assert seen == ["http://llm.example.test/v1/chat/completions"]


def test_upstream_pool_reuses_connections_and_reads_gzip_and_chunked(start_gateway, upstream):
    def script(h, body):
        data = gzip.compress(json.dumps(chat_completion("zipped")).encode())
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for i in range(0, len(data), 7):
            piece = data[i : i + 7]
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        h.wfile.write(b"0\r\n\r\n")

    up = upstream(script)
    gw = start_gateway(env=openai_env(up))
    for _ in range(5):
        status, _, body = post(gw, "/v1/chat/completions", CHAT)
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "zipped"
    assert len(up.requests) == 5 and up.connections == 1


def test_client_disconnect_cancels_the_upstream_stream(start_gateway, upstream):
    events = chat_chunks(words=["w"] * 200)

    up = upstream(lambda h, body: reply_sse(h, events, delay=0.05))
    gw = start_gateway(env=openai_env(up))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        body = json.dumps({**CHAT, "stream": True}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert b"200 OK" in s.recv(4096)
    deadline = time.monotonic() + 10
    while up.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert up.disconnects == 1  # the gateway closed its upstream connection instead of reading on
    rows = gw.rows()
    assert rows[-1]["status"] == 499 and "disconnected" in rows[-1]["error"]
    assert_serving(gw)


def test_graceful_shutdown_finishes_in_flight_stream_and_flushes_ledger(start_gateway, upstream):
    up = upstream(lambda h, body: reply_sse(h, chat_chunks(words=["a"] * 10), delay=0.1))
    gw = start_gateway(env=openai_env(up))
    result = {}

    def client():
        result["response"] = post(gw, "/v1/chat/completions", {**CHAT, "stream": True}, timeout=20)

    t = threading.Thread(target=client)
    t.start()
    while not up.requests:
        time.sleep(0.02)
    ledger_path = gw.gateway.ledger.path
    gw.stop()  # SIGTERM's path: stop accepting, finish in-flight, flush
    t.join(20)
    status, _, body = result["response"]
    assert status == 200 and sse_data(body)[-1] == "[DONE]"
    rows = (
        sqlite3.connect(ledger_path).execute("SELECT status, prompt_tokens, completion_tokens FROM requests").fetchall()
    )
    assert rows == [(200, 9, 2)]


def test_sigterm_stops_the_process_cleanly(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), TOKLIGENCE_LEDGER_PATH=str(tmp_path / "l.db"))
    proc = subprocess.Popen(
        [sys.executable, TGW, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/chat/completions", json.dumps(CHAT))
        assert conn.getresponse().status == 200
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        proc.kill() if proc.poll() is None else None
    rows = sqlite3.connect(tmp_path / "l.db").execute("SELECT model_requested, lane FROM requests").fetchall()
    assert rows == [("gpt-4o-mini", "loopback")]


# ======================================================================================
# 6. Loopback model
# ======================================================================================


def test_loopback_is_deterministic_and_streams(start_gateway):
    gw = start_gateway()
    first = json.loads(post(gw, "/v1/chat/completions", CHAT)[2])
    second = json.loads(post(gw, "/v1/chat/completions", CHAT)[2])
    assert first["choices"] == second["choices"] and first["id"] == second["id"]
    assert first["choices"][0]["message"]["content"] == "Hello from the tgw loopback model. You said: hello"
    assert first["usage"]["completion_tokens"] > 0
    status, headers, body = post(
        gw, "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    chunks = sse_data(body)
    assert chunks[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    assert text == first["choices"][0]["message"]["content"]
    assert (
        chunks[-2]["usage"]["completion_tokens"] == first["usage"]["completion_tokens"] and chunks[-2]["choices"] == []
    )
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]][-1] == "stop"


def test_loopback_answers_with_a_tool_call_on_request_then_uses_the_result(start_gateway):
    gw = start_gateway()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": 'weather? [[tool:get_weather {"city": "Paris"}]]'}]
    body = json.loads(post(gw, "/v1/chat/completions", {"model": "loopback", "messages": messages, "tools": tools})[2])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    messages += [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    body = json.loads(post(gw, "/v1/chat/completions", {"model": "loopback", "messages": messages, "tools": tools})[2])
    assert body["choices"][0]["message"]["content"] == "Tool result received: sunny"
    stream = sse_data(
        post(
            gw, "/v1/chat/completions", {"model": "loopback", "messages": messages[:1], "tools": tools, "stream": True}
        )[2]
    )
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in stream[:-1]
        if c["choices"] and c["choices"][0]["delta"].get("tool_calls")
    ]
    assert (
        calls[0]["function"]["name"] == "get_weather"
        and "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    )


def test_loopback_embeddings_are_deterministic_floats_and_base64(start_gateway):
    gw = start_gateway()
    floats = json.loads(
        post(gw, "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 8})[2]
    )
    again = json.loads(
        post(gw, "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 8})[2]
    )
    assert floats["data"] == again["data"] and len(floats["data"]) == 2 and len(floats["data"][0]["embedding"]) == 8
    assert floats["data"][0]["embedding"] != floats["data"][1]["embedding"]
    assert abs(sum(v * v for v in floats["data"][0]["embedding"]) - 1) < 1e-3
    b64 = json.loads(
        post(
            gw,
            "/v1/embeddings",
            {"model": "text-embedding-3-small", "input": "a", "dimensions": 8, "encoding_format": "base64"},
        )[2]
    )
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert [round(v, 5) for v in decoded] == [round(v, 5) for v in floats["data"][0]["embedding"]]


# ======================================================================================
# 9. Gateway: the OpenAI lane
# ======================================================================================


def test_health_and_models(start_gateway, upstream):
    up = upstream(lambda h, b: reply_json(h, chat_completion()))
    gw = start_gateway(env={**openai_env(up), "TOKLIGENCE_MODEL_ALIASES": "fast=>gpt-4o-mini",
                            "TOKLIGENCE_MODEL_PROVIDER_ROUTES": "gpt-4o-mini=>openai,gpt*=>openai"})  # fmt: skip
    health = json.loads(get(gw, "/health")[2])
    assert (
        health["work_mode"] == "auto"
        and "gpt*=>openai" in health["routes"]
        and health["providers"]["openai"]["configured"]
    )
    models = json.loads(get(gw, "/v1/models")[2])
    ids = {m["id"]: m["owned_by"] for m in models["data"]}
    assert models["object"] == "list" and ids["fast"] == "openai" and ids["gpt-4o-mini"] == "openai"
    anthropic_shape = json.loads(get(gw, "/v1/models", {"anthropic-version": "2023-06-01"})[2])
    assert anthropic_shape["data"][0]["type"] == "model" and anthropic_shape["has_more"] is False
    assert json.loads(get(gw, "/v1/models/fast")[2])["owned_by"] == "openai"


def test_chat_passthrough_forwards_body_and_answer_untouched(start_gateway, upstream):
    answer = chat_completion("exact bytes", prompt=21, completion=4, cached=5)
    up = upstream(lambda h, b: reply_json(h, answer))
    gw = start_gateway(env=openai_env(up))
    request = {**CHAT, "temperature": 0.3, "seed": 7, "logit_bias": {"50256": -100}, "user": "u1"}
    status, _, body = post(gw, "/v1/chat/completions", request, {"Authorization": "Bearer client-key"})
    assert status == 200 and json.loads(body) == answer
    sent = up.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["body"] == request
    assert sent["headers"]["Authorization"] == "Bearer sk-upstream-secret-123456"
    row = gw.rows()[-1]
    assert (row["lane"], row["provider"], row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        "passthrough",
        "openai",
        21,
        4,
        5,
    )
    assert row["cost_usd"] == pytest.approx((16 * 0.15 + 5 * 0.075 + 4 * 0.60) / 1e6)


def test_alias_renames_the_model_for_the_upstream(start_gateway, upstream):
    up = upstream(lambda h, b: reply_json(h, chat_completion()))
    gw = start_gateway(env={**openai_env(up), "TOKLIGENCE_MODEL_ALIASES": "fast=>gpt-4o-mini"})
    assert post(gw, "/v1/chat/completions", {**CHAT, "model": "fast"})[0] == 200
    assert up.requests[0]["body"]["model"] == "gpt-4o-mini"
    row = gw.rows()[-1]
    assert (row["model_requested"], row["model_upstream"]) == ("fast", "gpt-4o-mini")


def test_stream_without_include_usage_hides_the_usage_chunk_but_ledger_has_it(start_gateway, upstream):
    up = upstream(lambda h, b: reply_sse(h, chat_chunks(prompt=13, completion=2)))
    gw = start_gateway(env=openai_env(up))
    status, _, body = post(gw, "/v1/chat/completions", {**CHAT, "stream": True})
    chunks = sse_data(body)
    assert status == 200 and chunks[-1] == "[DONE]"
    assert all(c.get("choices") for c in chunks[:-1])  # no usage-only chunk reached the client
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello"
    assert up.requests[0]["body"]["stream_options"] == {"include_usage": True}
    row = gw.rows()[-1]
    assert (row["stream"], row["prompt_tokens"], row["completion_tokens"]) == (1, 13, 2)
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]


def test_stream_with_include_usage_is_forwarded_byte_for_byte(start_gateway, upstream):
    events = chat_chunks()
    up = upstream(lambda h, b: reply_sse(h, events))
    gw = start_gateway(env=openai_env(up))
    status, _, body = post(
        gw, "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    expected = "".join(e if isinstance(e, str) else "data: " + json.dumps(e) + "\n\n" for e in events).encode()
    assert status == 200 and body == expected


def test_embeddings_passthrough(start_gateway, upstream):
    vector = base64.b64encode(struct.pack("<3f", 0.1, 0.2, 0.3)).decode()
    answer = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}], "model": "text-embedding-3-small",
              "usage": {"prompt_tokens": 3, "total_tokens": 3}}  # fmt: skip
    up = upstream(lambda h, b: reply_json(h, answer))
    gw = start_gateway(env=openai_env(up))
    request = {"model": "text-embedding-3-small", "input": ["hello"], "encoding_format": "base64"}
    status, _, body = post(gw, "/v1/embeddings", request)
    assert status == 200 and json.loads(body) == answer
    assert up.requests[0]["path"] == "/v1/embeddings" and up.requests[0]["body"] == request
    assert gw.rows()[-1]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "body is empty"),
        (json.dumps({"messages": []}).encode(), "'model' is required"),
        (json.dumps({"model": 5, "messages": []}).encode(), "'model' must be a string"),
        (json.dumps({"model": "gpt-4o", "messages": "hi"}).encode(), "'messages' must be an array"),
        (json.dumps({"model": "gpt-4o", "messages": [], "stream": "yes"}).encode(), "'stream' must be a boolean"),
        (json.dumps({"model": "gpt-4o", "messages": [{"role": "wizard", "content": "x"}]}).encode(), "role must be"),
        (
            json.dumps({"model": "gpt-4o", "messages": [], "max_tokens": "many"}).encode(),
            "'max_tokens' must be an integer",
        ),
    ],
)
def test_bad_chat_requests_get_openai_errors_and_the_gateway_keeps_serving(start_gateway, body, words):
    gw = start_gateway()
    status, _, payload = post(gw, "/v1/chat/completions", body)
    error = json.loads(payload)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and words in error["message"]
    assert_serving(gw)


def test_unknown_model_and_unconfigured_provider_errors(start_gateway, upstream):
    up = upstream(lambda h, b: reply_json(h, chat_completion()))
    gw = start_gateway(env=openai_env(up))
    status, _, body = post(gw, "/v1/chat/completions", {**CHAT, "model": "mystery-1"})
    assert status == 404 and "matches no route" in json.loads(body)["error"]["message"]
    status, _, body = post(gw, "/v1/chat/completions", {**CHAT, "model": "claude-sonnet-4-5"})
    assert status == 400 and "anthropic_api_key" in json.loads(body)["error"]["message"]
    assert [r["status"] for r in gw.rows(2)] == [404, 400]


def test_upstream_error_keeps_status_and_message(start_gateway, upstream):
    err = {
        "error": {"message": "Rate limit reached for gpt-4o-mini", "type": "requests", "code": "rate_limit_exceeded"}
    }
    up = upstream(lambda h, b: reply_json(h, err, status=429, headers={"Retry-After": "0"}))
    gw = start_gateway(env=openai_env(up), upstream_retries=1)
    status, headers, body = post(gw, "/v1/chat/completions", CHAT)
    assert status == 429 and json.loads(body)["error"]["message"] == "Rate limit reached for gpt-4o-mini"
    assert len(up.requests) == 2  # retried once, honouring Retry-After: 0
    row = gw.rows()[-1]
    assert row["status"] == 429 and "Rate limit" in row["error"]


def test_retry_succeeds_after_a_transient_503(start_gateway, upstream):
    answers = [(503, {"error": {"message": "overloaded"}}), (200, chat_completion("second try"))]
    up = upstream(lambda h, b: reply_json(h, answers[len(up.requests) - 1][1], status=answers[len(up.requests) - 1][0]))
    gw = start_gateway(env=openai_env(up))
    status, _, body = post(gw, "/v1/chat/completions", CHAT)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "second try"


def test_unreachable_upstream_is_502_and_gateway_keeps_serving(start_gateway):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gw = start_gateway(env={"TOKLIGENCE_OPENAI_BASE_URL": f"http://127.0.0.1:{dead_port}/v1"}, upstream_retries=0)
    status, _, body = post(gw, "/v1/chat/completions", CHAT)
    error = json.loads(body)["error"]
    assert (
        status == 502 and "cannot connect to upstream 127.0.0.1" in error["message"] and error["type"] == "server_error"
    )
    assert_serving(gw)


def test_silent_upstream_times_out_with_504(start_gateway, upstream):
    release = threading.Event()
    up = upstream(lambda h, b: release.wait(10))
    gw = start_gateway(env=openai_env(up), upstream_read_timeout=0.5, upstream_retries=0)
    started = time.monotonic()
    status, _, body = post(gw, "/v1/chat/completions", CHAT)
    release.set()
    assert status == 504 and "did not answer within 0.5 s" in json.loads(body)["error"]["message"]
    assert time.monotonic() - started < 5
    assert_serving(gw)


def test_upstream_dropping_mid_stream_ends_the_stream_with_an_error(start_gateway, upstream):
    up = upstream(lambda h, b: reply_sse(h, chat_chunks(words=["a", "b", "c"]), drop_after=2))
    gw = start_gateway(env=openai_env(up))
    status, _, body = post(gw, "/v1/chat/completions", {**CHAT, "stream": True})
    chunks = sse_data(body)
    assert status == 200 and "error" in chunks[-1] and "closed the connection" in chunks[-1]["error"]["message"]
    assert gw.rows()[-1]["error"]
    assert_serving(gw)


def test_upstream_sending_garbage_is_502(start_gateway, upstream):
    def script(h, b):
        h.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
        h.close_connection = True

    up = upstream(script)
    gw = start_gateway(env=openai_env(up), upstream_retries=0)
    status, _, body = post(gw, "/v1/chat/completions", CHAT)
    assert status == 502 and "did not speak HTTP" in json.loads(body)["error"]["message"]


def test_stream_keepalive_while_upstream_is_silent(start_gateway, upstream):
    def script(h, b):
        time.sleep(0.7)
        reply_sse(h, chat_chunks())

    up = upstream(script)
    gw = start_gateway(env=openai_env(up), stream_keepalive=0.2)
    status, _, body = post(gw, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and body.startswith(b": keep-alive\n\n") and sse_data(body)[-1] == "[DONE]"


# ======================================================================================
# 8. Ledger
# ======================================================================================


def test_ledger_never_drops_rows_with_a_tiny_queue(start_gateway):
    gw = start_gateway(ledger_queue_size=1)
    for i in range(40):
        assert post(gw, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": str(i)}]})[0] == 200
    rows = gw.rows(40)
    assert len(rows) == 40 and len({r["request_id"] for r in rows}) == 40


def test_ledger_row_fields_and_usage_and_logs_commands(start_gateway, tmp_path):
    gw = start_gateway()
    post(gw, "/v1/chat/completions", CHAT)
    post(gw, "/v1/chat/completions", {**CHAT, "stream": True})
    post(gw, "/v1/chat/completions", b"{broken")
    rows = gw.rows(2)
    assert [(r["client_protocol"], r["endpoint"], r["lane"], r["stream"], r["status"]) for r in rows] == [
        ("openai", "/v1/chat/completions", "loopback", 0, 200),
        ("openai", "/v1/chat/completions", "loopback", 1, 200),
    ]  # a body that is not JSON never reached a model: no ledger row
    assert rows[0]["prompt_tokens"] > 0 and rows[0]["latency_ms"] > 0 and rows[0]["request_id"].startswith("req_")
    ini = tmp_path / "cli.ini"
    ini.write_text(f"ledger_path = {gw.gateway.ledger.path}\n")
    usage = subprocess.run(
        [sys.executable, TGW, "usage", "--config", str(ini)], capture_output=True, text=True, timeout=30
    )
    assert (
        usage.returncode == 0
        and "by model" in usage.stdout
        and "gpt-4o-mini" in usage.stdout
        and "by day" in usage.stdout
    )
    data = json.loads(subprocess.run([sys.executable, TGW, "usage", "--config", str(ini), "--by", "provider", "--json"],
                                     capture_output=True, text=True, timeout=30).stdout)  # fmt: skip
    assert data["provider"][0]["name"] == "loopback" and data["provider"][0]["requests"] == 2
    logs = subprocess.run(
        [sys.executable, TGW, "logs", "--config", str(ini), "-n", "5"], capture_output=True, text=True, timeout=30
    )
    assert logs.returncode == 0 and logs.stdout.count("gpt-4o-mini") == 2 and "stream" in logs.stdout


def test_price_table_from_config_overrides_defaults(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[prices]\ngpt-4o-mini* = 1, 2, 0.5\n")
    cfg = tgw.load_config(str(ini), {}, env={})
    table = tgw.PriceTable(cfg.prices)
    assert table.cost("gpt-4o-mini", tgw.Usage(1_000_000, 1_000_000, 0)) == 3.0
    assert table.cost("claude-sonnet-4-5", tgw.Usage(1_000_000, 0)) == 3.0
    assert table.cost("unknown", tgw.Usage(10, 10)) == 0.0


# ======================================================================================
# Security
# ======================================================================================


def test_public_bind_is_refused_without_api_keys(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, TGW, "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )
    assert out.returncode == 2 and "api_keys" in out.stderr and "--allow-public-bind" in out.stderr


def test_api_keys_are_enforced_and_secrets_never_logged(start_gateway, upstream, caplog):
    up = upstream(lambda h, b: reply_json(h, {"error": {"message": "bad"}}, status=500))
    gw = start_gateway(
        env=openai_env(up, key="sk-upstream-TOPSECRET-999"),
        api_keys="gw-key-1,gw-key-2",
        upstream_retries=0,
        log_level="debug",
    )
    status, _, body = post(gw, "/v1/chat/completions", CHAT)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert post(gw, "/v1/chat/completions", CHAT, {"Authorization": "Bearer wrong"})[0] == 401
    assert post(gw, "/v1/chat/completions", CHAT, {"Authorization": "Bearer gw-key-2"})[0] == 500
    assert get(gw, "/health")[0] == 200  # health stays public
    rows = gw.rows(3)
    assert rows[-1]["api_key_id"] == tgw.key_fingerprint("gw-key-2")
    ledger_bytes = Path(gw.gateway.ledger.path).read_bytes() + Path(gw.gateway.ledger.path + "-wal").read_bytes()
    for secret in (b"sk-upstream-TOPSECRET-999", b"gw-key-2"):
        assert secret not in ledger_bytes
        assert secret.decode() not in caplog.text
