"""Many HTTP/1.1 requests over a few keep-alive connections, cheaply, to count them exactly afterwards.

httpx costs about a millisecond of the test's own CPU per request; for the tests that send ten thousand,
that was most of their time on 2 cores shared with the servers under test (and, under pytest-xdist, with
other tests). This client does only what those tests need: requests without a body on asyncio streams,
framed and parsed by h11 (Uvicorn's own HTTP/1.1 library, installed with it), a new connection after
each one that closes. Uvicorn drops the connection after an app exception without saying so in its 500,
so requests to such routes must ask for `Connection: close` themselves (`closing`), or the next request
on that connection would be reset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import h11


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.h11 = h11.Connection(h11.CLIENT)

    async def request(self, method: str, target: str, close: bool) -> int:
        """Send one request, read its whole response, return its status; reconnect when the server closed."""
        if self.writer is None or self.h11.our_state is not h11.IDLE:
            await self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.h11 = h11.Connection(h11.CLIENT)
        assert self.reader is not None and self.writer is not None
        headers = [("Host", f"{self.host}:{self.port}"), ("Content-Length", "0")]
        if close:
            headers.append(("Connection", "close"))
        self.writer.write(self.h11.send(h11.Request(method=method, target=target, headers=headers)))
        self.writer.write(self.h11.send(h11.EndOfMessage()))
        await self.writer.drain()
        status = 0
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError(f"{method} {target}: the server closed the connection mid-response")
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()  # keep-alive; a closing server leaves MUST_CLOSE: reconnect next time
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await asyncio.gather(self.writer.wait_closed(), return_exceptions=True)
            self.writer = None


async def _send_all(
    host: str, port: int, plan: list[tuple[str, str]], connections: int, closing: frozenset[str]
) -> list[tuple[str, str, int]]:
    queue = list(reversed(plan))
    done: list[tuple[str, str, int]] = []

    async def one_connection() -> None:
        connection = _Connection(host, port)
        try:
            while queue:
                method, target = queue.pop()
                done.append((method, target, await connection.request(method, target, target in closing)))
        finally:
            await connection.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return done


def send_all(
    host: str,
    port: int,
    plan: Iterable[tuple[str, str]],
    connections: int = 16,
    closing: Iterable[str] = (),
) -> list[tuple[str, str, int]]:
    """(method, target, status) of every request of `plan`, sent over `connections` connections at once.

    Requests to the targets in `closing` ask the server to close their connection afterwards.
    """
    return asyncio.run(_send_all(host, port, list(plan), connections, frozenset(closing)))
