#!/usr/bin/env python3
"""Time to first token and whole-stream time, one request at a time over one keep-alive connection.

    python3 bench/ttft.py URL BODY_FILE [--n 300] [--marker tok0] [--anthropic]

Prints one JSON line: medians and p90s in milliseconds, and the events counted in the last answer.
The first token is the first time `marker` (the mock's first text piece) has arrived, whatever the
protocol the answer is in, so the same client measures the mock directly, the minimal proxy and tgw.
"""

import argparse
import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit


def read_answer(sock, marker: bytes) -> tuple[float | None, bytes]:
    """Read one HTTP/1.1 answer (Content-Length or chunked); when marker first arrived, and the body."""
    buf = b""
    first = None
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"not a 200: {head[:200]!r}")
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    body = rest
    if marker in body:
        first = time.perf_counter()
    while True:
        if length is not None and len(body) >= length:
            return first, body[:length]
        if chunked and body.endswith(b"\r\n0\r\n\r\n") or body == b"0\r\n\r\n":
            return first, body
        data = sock.recv(262144)
        if not data:
            raise SystemExit("connection closed mid-answer")
        body += data
        if first is None and marker in body[-len(data) - len(marker) :]:
            first = time.perf_counter()


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("body")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--marker", default="tok0")
    parser.add_argument("--anthropic", action="store_true")
    parser.add_argument("--api-key", default="sk-bench-client", help="sent where the client's SDK sends it")
    args = parser.parse_args()
    parts = urlsplit(args.url)
    body = Path(args.body).read_bytes().strip()
    if args.anthropic:
        extra = f"anthropic-version: 2023-06-01\r\nx-api-key: {args.api_key}\r\n"
    else:
        extra = f"Authorization: Bearer {args.api_key}\r\n"
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    marker = args.marker.encode()
    ttft, total = [], []
    answer = b""
    for i in range(args.warmup + args.n):
        start = time.perf_counter()
        sock.sendall(request)
        first, answer = read_answer(sock, marker)
        end = time.perf_counter()
        if first is None:
            raise SystemExit(f"marker {args.marker!r} never arrived: {answer[:300]!r}")
        if i >= args.warmup:
            ttft.append((first - start) * 1000)
            total.append((end - start) * 1000)
    sock.close()
    print(json.dumps({
        "n": args.n, "ttft_p50_ms": round(percentile(ttft, 0.5), 3), "ttft_p90_ms": round(percentile(ttft, 0.9), 3),
        "total_p50_ms": round(percentile(total, 0.5), 3), "total_p90_ms": round(percentile(total, 0.9), 3),
        "events": answer.count(b"\n\n"), "bytes": len(answer),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
