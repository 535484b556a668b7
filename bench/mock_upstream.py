#!/usr/bin/env python3
"""The mock LLM upstream of the benchmark: every answer it gives, in one place.

    python3 bench/mock_upstream.py nginx DIR          # write DIR/nginx.conf and DIR/www/ (the long streams)
    python3 bench/mock_upstream.py serve [--port N]   # the same answers from a stdlib server (much slower)

Endpoints on 127.0.0.1:18080 ($TGW_BENCH_MOCK_PORT to change it; any method; the request body is read and ignored):
    /v1/chat/completions, /v1/messages             a JSON answer with usage
    /stream/v1/chat/completions, /stream/v1/...    a short SSE stream (4 events)
    /long/v1/chat/completions, /long/v1/messages   a long SSE stream: LONG_EVENTS text deltas, the
                                                   shape of a coding agent's answer
    /v1/models, /health
nginx cannot look at "stream": true in a body cheaply, so a stream is chosen by base URL: a gateway
under test points its provider at http://127.0.0.1:18080/long/v1 (or /long for Anthropic).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PORT = int(os.environ.get("TGW_BENCH_MOCK_PORT", "18080"))
LONG_EVENTS = 400  # text deltas per long stream: a few hundred, like a long agent answer
CONTENT = "Hello! This is a mock response."
MODEL_OPENAI = "gpt-4o-mini"
MODEL_ANTHROPIC = "claude-3-5-haiku-20241022"


def _j(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def openai_json() -> str:
    return _j({
        "id": "chatcmpl-mock0001", "object": "chat.completion", "created": 1700000000, "model": MODEL_OPENAI,
        "system_fingerprint": "fp_mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    })  # fmt: skip


def anthropic_json() -> str:
    return _j({
        "id": "msg_mock0001", "type": "message", "role": "assistant", "model": MODEL_ANTHROPIC,
        "content": [{"type": "text", "text": CONTENT}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 8},
    })  # fmt: skip


def openai_stream(pieces: list[str]) -> str:
    def chunk(delta, finish=None):
        return "data: " + _j({
            "id": "chatcmpl-mock0001", "object": "chat.completion.chunk", "created": 1700000000,
            "model": MODEL_OPENAI, "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }) + "\n\n"  # fmt: skip

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": piece}) for piece in pieces]
    out.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 12, "completion_tokens": len(pieces), "total_tokens": 12 + len(pieces)}
    out.append("data: " + _j({"id": "chatcmpl-mock0001", "object": "chat.completion.chunk", "created": 1700000000,
                              "model": MODEL_OPENAI, "choices": [], "usage": usage}) + "\n\n")  # fmt: skip
    out.append("data: [DONE]\n\n")
    return "".join(out)


def anthropic_stream(pieces: list[str]) -> str:
    def event(name, data):
        return f"event: {name}\ndata: {_j(data)}\n\n"

    message = {"id": "msg_mock0001", "type": "message", "role": "assistant", "model": MODEL_ANTHROPIC, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}}  # fmt: skip
    out = [event("message_start", {"type": "message_start", "message": message})]
    out.append(event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}}))  # fmt: skip
    out.append(event("ping", {"type": "ping"}))
    for piece in pieces:
        out.append(event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": piece}}))  # fmt: skip
    out.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                       "stop_sequence": None}, "usage": {"output_tokens": len(pieces)}}))  # fmt: skip
    out.append(event("message_stop", {"type": "message_stop"}))
    return "".join(out)


SHORT = ["Hello!", " This is a mock response."]
LONG = [f"tok{i} " for i in range(LONG_EVENTS - 1)] + ["mock response."]
MODELS = _j({"object": "list", "data": [
    {"id": MODEL_OPENAI, "object": "model", "created": 1700000000, "owned_by": "mock"},
    {"id": MODEL_ANTHROPIC, "object": "model", "created": 1700000000, "owned_by": "mock"},
]})  # fmt: skip

# path -> (content type, body)
ANSWERS = {
    "/health": ("application/json", '{"status":"ok"}'),
    "/v1/models": ("application/json", MODELS),
    "/v1/chat/completions": ("application/json", openai_json()),
    "/v1/messages": ("application/json", anthropic_json()),
    "/stream/v1/chat/completions": ("text/event-stream", openai_stream(SHORT)),
    "/stream/v1/messages": ("text/event-stream", anthropic_stream(SHORT)),
    "/long/v1/chat/completions": ("text/event-stream", openai_stream(LONG)),
    "/long/v1/messages": ("text/event-stream", anthropic_stream(LONG)),
}
for _prefix in ("/stream", "/long"):
    ANSWERS[_prefix + "/v1/models"] = ANSWERS["/v1/models"]


def nginx_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def write_nginx(root: Path) -> Path:
    """nginx.conf for the mock. Short answers are `return` literals (nginx caps a literal at 4 KB);
    long streams are static files, which nginx serves to a POST through the 405 -> 200 redirect."""
    for sub in ("logs", "tmp", "www"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    locations = []
    for path, (ctype, body) in ANSWERS.items():
        if len(body) < 3500:
            locations.append(f"        location = {path} {{ default_type {ctype}; return 200 {nginx_literal(body)}; }}")
        else:
            target = root / "www" / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
            locations.append(
                f"        location = {path} {{ root {root / 'www'}; default_type {ctype}; error_page 405 =200 $uri; }}"
            )
    conf = f"""# written by bench/mock_upstream.py; the mock upstream on 127.0.0.1:{PORT}
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/logs/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {root}/tmp/client_body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    client_body_buffer_size 1m;
    client_max_body_size 16m;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
    tcp_nodelay on;
    etag off;
    server {{
        listen 127.0.0.1:{PORT} backlog=4096 reuseport;
{chr(10).join(locations)}
        location / {{ default_type application/json; return 404 '{{"error":{{"message":"mock: unknown path","type":"not_found"}}}}'; }}
    }}
}}
"""
    path = root / "nginx.conf"
    path.write_text(conf)
    return path


class MockHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        ctype, body = ANSWERS.get(
            self.path.split("?")[0], ("application/json", '{"error":{"message":"mock: unknown path"}}')
        )
        data = body.encode()
        self.send_response(200 if self.path.split("?")[0] in ANSWERS else 404)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("nginx").add_argument("dir")
    serve_p = sub.add_parser("serve")
    serve_p.add_argument("--port", type=int, default=PORT)
    args = parser.parse_args(argv)
    if args.command == "nginx":
        print(write_nginx(Path(args.dir).resolve()))
        return 0
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024
    ThreadingHTTPServer(("127.0.0.1", args.port), MockHandler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
