#!/usr/bin/env python3
"""The benchmark's ceiling: the least work a stdlib asyncio-streams proxy can do.

    python3 bench/minimal_proxy.py PORT [UPSTREAM_PREFIX]

Forwards each POST to the mock on 127.0.0.1:18080 under UPSTREAM_PREFIX (e.g. /long for the long
streams). A JSON answer is parsed (as a gateway must, to count tokens) and sent back; an SSE
answer is relayed as it arrives, chunked, with the events that carry usage parsed. No routing,
auth, ledger, error handling, timeouts or chunked request bodies: it is not a gateway, it is the
most one Python process on one core can forward, measured in the same run as the gateway.
"""

import asyncio
import json
import sys

UPSTREAM = ("127.0.0.1", 18080)


class Pool:
    def __init__(self):
        self.free = []

    async def get(self):
        return self.free.pop() if self.free else await asyncio.open_connection(*UPSTREAM)


POOL = Pool()
PREFIX = (sys.argv[2] if len(sys.argv) > 2 else "").encode()


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            return int(line[15:])
    return 0


async def relay_stream(ur, length: int, w) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    rest = b""
    while length > 0:
        data = await ur.read(min(length, 65536))
        if not data:
            raise ConnectionError("upstream closed")
        length -= len(data)
        w.write(b"%x\r\n%b\r\n" % (len(data), data))
        events = (rest + data).split(b"\n\n")
        rest = events.pop()
        for event in events:
            if b'"usage"' in event:
                json.loads(event.split(b"data: ", 1)[1])
        await w.drain()
    w.write(b"0\r\n\r\n")


async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            length = content_length(head)
            body = await r.readexactly(length) if length else b""
            data = json.dumps(json.loads(body)).encode()
            ur, uw = await POOL.get()
            uw.write(
                b"POST %b%b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (PREFIX, path, len(data))
                + data
            )
            uhead = await ur.readuntil(b"\r\n\r\n")
            ulength = content_length(uhead)
            if b"text/event-stream" in uhead:
                await relay_stream(ur, ulength, w)
            else:
                out = await ur.readexactly(ulength)
                json.loads(out).get("usage")
                w.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(out) + out
                )
            POOL.free.append((ur, uw))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        w.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
