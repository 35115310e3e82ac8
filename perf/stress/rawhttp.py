"""Raw keep-alive HTTP/1.1 connections on asyncio streams, for timing the server alone: a refusal's
latency is read from the request's last byte written to the response head, on a connection opened
(and used once) before the burst, so no client library's per-request overhead is in it."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    seconds: float = 0.0  # from the request's last byte written to the response head read


class Conn:
    """One keep-alive HTTP/1.1 connection on raw asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.sent_at = 0.0

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        return cls(*await asyncio.open_connection(host, port))

    def send(self, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in {"Content-Type": "application/json", **(headers or {})}.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        self.sent_at = time.perf_counter()

    async def head(self) -> Response:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        seconds = time.perf_counter() - self.sent_at
        lines = raw.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        return Response(int(lines[0].split()[1]), headers, seconds=seconds)

    async def response(self) -> Response:
        """The whole response; a chunked body is joined."""
        r = await self.head()
        if "content-length" in r.headers:
            r.body = await self.reader.readexactly(int(r.headers["content-length"]))
        else:
            r.body = b"".join([chunk async for chunk in self.chunks()])
        return r

    async def chunks(self):
        """The chunks of a chunked body (each SSE event the daemon writes is one chunk)."""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            yield data[:-2]

    def abort(self) -> None:
        """Drop the connection at once (RST), as a client that crashed would."""
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


async def open_warm(host: str, port: int, n: int) -> list[Conn]:
    """n connections, each used once (GET /health/live) so the server has set it up fully."""
    conns = await asyncio.gather(*(Conn.open(host, port) for _ in range(n)))
    for c in conns:
        c.send("GET", "/health/live")
    await asyncio.gather(*(c.response() for c in conns))
    return list(conns)


def host_port(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)
