#!/usr/bin/env python3
"""The fault mix of issue 14: a third of upstream attempts fail at random while 50 clients call
the gateway; every request must be answered and the ledger must hold exactly one row per request.

    python3 bench/fault_mix.py                     # 60 s, 50 clients: starts a faulty upstream and tgw
    python3 bench/fault_mix.py --duration 10 --clients 20
    python3 bench/fault_mix.py --print-config      # the gateway.ini a running gateway needs, then:
    python3 bench/fault_mix.py --gateway http://127.0.0.1:8081 --ledger ~/.tokligence/ledger.db

The faulty upstream (127.0.0.1, --upstream-port) speaks OpenAI Chat and Anthropic Messages, JSON
and SSE. Each attempt fails with probability --fault-rate, as one of: 529 overloaded, 503, 500,
429 (no Retry-After), the connection dropped before any answer, or a stream cut after its
first event. The gateway has two OpenAI keys (a pool) and Anthropic, each model falling back to
the other (model_fallbacks), so most faults are failed over. Clients send their own X-Request-Id,
so each answer is matched to exactly one ledger row. Standard library only; 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mock_upstream import SHORT, anthropic_json, anthropic_stream, openai_json, openai_stream  # noqa: E402

OPENAI_KEYS = ("sk-fault-mix-a-1111", "sk-fault-mix-b-2222")
ANTHROPIC_KEY = "sk-ant-fault-mix-3333"
FAULTS = ("529", "503", "500", "429", "drop", "cut_stream")


def gateway_settings(upstream_port: int) -> dict:
    """The settings a gateway under the fault mix needs (top-level gateway.ini keys)."""
    base = f"http://127.0.0.1:{upstream_port}"
    return {
        "openai_base_url": f"{base}/v1",
        "openai_api_key": ", ".join(OPENAI_KEYS),
        "anthropic_base_url": base,
        "anthropic_api_key": ANTHROPIC_KEY,
        "model_fallbacks": "gpt-4o-mini=>claude-3-5-haiku-20241022, claude-3-5-haiku*=>gpt-4o-mini",
    }


class FaultyUpstream:
    """OpenAI and Anthropic answers, a `fault_rate` share of them replaced by a random fault."""

    def __init__(self, port: int = 0, fault_rate: float = 1 / 3, seed: int = 14):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.fault_rate = fault_rate
        self.attempts = 0
        self.faults: Counter = Counter()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                upstream.answer(self, self.path.split("?")[0], bool(body.get("stream")))

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def pick_fault(self) -> str:
        with self.lock:
            self.attempts += 1
            if self.rng.random() >= self.fault_rate:
                return ""
            fault = self.rng.choice(FAULTS)
            self.faults[fault] += 1
            return fault

    def answer(self, h, path: str, stream: bool) -> None:
        anthropic = path.endswith("/messages")
        fault = self.pick_fault()
        if fault == "drop":
            h.close_connection = True  # nothing sent: the connection just closes
            return
        if fault and fault != "cut_stream":
            status = int(fault)
            error = ({"type": "error", "error": {"type": "overloaded_error", "message": f"fault {status}"}}
                     if anthropic else {"error": {"message": f"fault {status}", "type": "server_error"}})  # fmt: skip
            self.send(h, status, "application/json", json.dumps(error))
            return
        if not stream:
            self.send(h, 200, "application/json", anthropic_json() if anthropic else openai_json())
            return
        text = anthropic_stream(SHORT) if anthropic else openai_stream(SHORT)
        if fault == "cut_stream":  # the first event, then the connection breaks: too late for failover
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Content-Length", str(len(text)))
            h.end_headers()
            h.wfile.write(text.split("\n\n", 1)[0].encode() + b"\n\n")
            h.wfile.flush()
            h.close_connection = True
            return
        self.send(h, 200, "text/event-stream", text)

    @staticmethod
    def send(h, status: int, ctype: str, text: str, headers: dict | None = None) -> None:
        data = text.encode()
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


REQUESTS = (  # (path, body): half OpenAI, half Anthropic clients, half of each streaming
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/v1/messages", {"model": "claude-3-5-haiku-20241022", "max_tokens": 64,
                      "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/messages", {"model": "claude-3-5-haiku-20241022", "max_tokens": 64,
                      "messages": [{"role": "user", "content": "hi"}], "stream": True}),
)  # fmt: skip


def outcome(payload: bytes, stream: bool, status: int) -> str:
    """How an answer ended: "ok" (a JSON body, or a stream ending in [DONE] / message_stop),
    "error" (an error body, or a stream whose last event is an error), or "broken"."""
    if not stream or status != 200:
        try:
            json.loads(payload)
        except ValueError:
            return "broken"
        return "ok" if status == 200 else "error"
    events = [e for e in payload.decode("utf-8", "replace").replace("\r\n", "\n").split("\n\n") if e.strip()]
    if events and any(end in events[-1] for end in ("[DONE]", "message_stop")):
        return "ok"
    return "error" if events and '"error"' in events[-1] else "broken"


def client(base: str, number: int, until: float, results: list, seed: int) -> None:
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    rng = random.Random(seed * 1000 + number)
    sent = 0
    while time.monotonic() < until:
        sent += 1
        path, body = rng.choice(REQUESTS)
        request_id = f"fault-mix-{seed}-{number}-{sent}"
        started = time.monotonic()
        result = {"id": request_id, "status": 0, "outcome": "unanswered", "error": ""}
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", "X-Request-Id": request_id,
                                                          "anthropic-version": "2023-06-01"})  # fmt: skip
            resp = conn.getresponse()
            payload = resp.read()
            conn.close()
            result.update(status=resp.status, outcome=outcome(payload, body.get("stream", False), resp.status),
                          echoed=resp.getheader("x-request-id") == request_id)  # fmt: skip
        except (OSError, http.client.HTTPException) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["seconds"] = time.monotonic() - started
        results.append(result)


def run_clients(base: str, clients: int, duration: float, seed: int = 14) -> list[dict]:
    results: list[dict] = []
    until = time.monotonic() + duration
    threads = [
        threading.Thread(target=client, args=(base, n, until, results, seed), daemon=True) for n in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    return results


def ledger_rows(path: str, ids: set, wait: float = 15.0) -> Counter:
    """How many ledger rows each of `ids` has (waits, bounded, for the writer to catch up)."""
    deadline = time.monotonic() + wait
    while True:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            found = Counter(
                r[0] for r in db.execute("SELECT request_id FROM requests WHERE request_id LIKE 'fault-mix-%'")
            )
        finally:
            db.close()
        if all(found[i] for i in ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def report(results: list[dict], rows: Counter, upstream: FaultyUpstream | None) -> dict:
    ids = {r["id"] for r in results}
    statuses = Counter(r["status"] for r in results)
    latencies = sorted(r["seconds"] for r in results)
    outcomes = Counter(r["outcome"] for r in results)
    summary = {
        "requests": len(results),
        "answered": outcomes["ok"] + outcomes["error"],
        "unanswered": [r for r in results if r["outcome"] not in ("ok", "error")][:5],
        "succeeded": outcomes["ok"],
        "statuses": dict(sorted(statuses.items())),
        "streams_ended_by_an_error_event": sum(1 for r in results if r["status"] == 200 and r["outcome"] == "error"),
        "ledger_rows": sum(rows[i] for i in ids),
        "missing_rows": sorted(i for i in ids if rows[i] == 0)[:5],
        "duplicate_rows": sorted(i for i in ids if rows[i] > 1)[:5],
        "p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "p99_s": round(latencies[int(len(latencies) * 0.99)], 3) if latencies else None,
    }
    if upstream is not None:
        summary["upstream_attempts"] = upstream.attempts
        summary["upstream_faults"] = dict(upstream.faults)
    summary["ok"] = (
        summary["answered"] == len(results)
        and not summary["missing_rows"]
        and not summary["duplicate_rows"]
        and summary["ledger_rows"] == len(results)
    )
    return summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gateway(upstream_port: int, workdir: Path) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    ledger = str(workdir / "ledger.db")
    settings = {**gateway_settings(upstream_port), "facade_port": str(port), "ledger_path": ledger,
                "log_level": "error"}  # fmt: skip
    config = workdir / "gateway.ini"
    config.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKLIGENCE_") and "PROXY" not in k.upper()}
    tgw = Path(__file__).resolve().parent.parent / "tgw.py"
    proc = subprocess.Popen([sys.executable, str(tgw), "serve", "--config", str(config)], env=env, cwd=workdir,
                            stdout=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}", ledger
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("tgw did not start")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--fault-rate", type=float, default=1 / 3)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--upstream-port", type=int, default=0, help="the faulty upstream's port (default: any free)")
    parser.add_argument("--gateway", help="a running gateway's URL (configured as --print-config shows)")
    parser.add_argument("--ledger", help="with --gateway: its ledger_path")
    parser.add_argument("--print-config", action="store_true", help="print the gateway.ini keys for --upstream-port")
    args = parser.parse_args(argv)
    if args.print_config:
        port = args.upstream_port or 18181
        print("".join(f"{k} = {v}\n" for k, v in gateway_settings(port).items()), end="")
        return 0
    if args.gateway and not args.ledger:
        parser.error("--gateway needs --ledger (the gateway's ledger_path)")
    upstream = FaultyUpstream(args.upstream_port or (18181 if args.gateway else 0), args.fault_rate, args.seed)
    proc = None
    with tempfile.TemporaryDirectory(prefix="tgw-fault-mix-") as tmp:
        try:
            if args.gateway:
                base, ledger = args.gateway.rstrip("/"), str(Path(args.ledger).expanduser())
            else:
                proc, base, ledger = spawn_gateway(upstream.port, Path(tmp))
            print(f"fault mix: {args.clients} clients for {args.duration:g} s against {base}, "
                  f"{args.fault_rate:.0%} of upstream attempts failing", flush=True)  # fmt: skip
            results = run_clients(base, args.clients, args.duration, args.seed)
            if proc is not None:  # stop it: the ledger is flushed on shutdown
                proc.terminate()
                proc.wait(120)
            summary = report(results, ledger_rows(ledger, {r["id"] for r in results}), upstream)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
            upstream.close()
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
