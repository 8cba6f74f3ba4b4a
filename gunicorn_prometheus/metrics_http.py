"""A small HTTP/1.1 server for the metrics port, on asyncio: bounded in connections, time and size.

Why by hand: the stdlib's servers (wsgiref, http.server) take a thread per connection and have no head or
idle timeouts, so 2,000 idle connections made 2,001 threads, and under a 1,024 open-files limit they
starved `/healthz`. The ASGI servers we already depend on (Uvicorn) have no connection cap and no policy
for running out of file descriptors. This one serves two GET routes and nothing else, so it stays small:

- one thread runs every connection (an event loop); work that takes time runs in the handler's own pool;
- a connection must send a complete request head within HEAD_TIMEOUT, and may stay idle between
  requests for IDLE_TIMEOUT; a TLS handshake gets HANDSHAKE_TIMEOUT;
- request line > MAX_REQUEST_LINE bytes: 414; head > MAX_HEAD bytes or > MAX_HEADERS lines: 431;
- every byte a client sends is checked where the head is parsed, before any handler sees it: a target
  that is not a plain path (optionally with a query) or a control character anywhere in the head is 400.
  What a handler gets (`Request.path`, header values) needs no further parsing that could fail, so no
  client can make the server log a traceback;
- asyncio's write flow control is respected: while a response is still buffered above the transport's
  high-water mark (the client reads slowly, or not at all), the next pipelined request is neither read nor
  parsed, so a connection holds at most one response however many requests it sends; a response that
  makes no progress for SEND_TIMEOUT (the client reads nothing) closes the connection;
- at most `max_connections` at once (well below the open-files limit): a new connection over the cap,
  or an accept that fails for lack of file descriptors (EMFILE), closes the connection that has waited
  longest without a request in progress; with none to close, accepting pauses briefly (no busy loop;
  the kernel keeps queueing).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import re
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0  # a buffered response must make progress (the client read some of it) this often
MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
DEFAULT_MAX_CONNECTIONS = 512
FD_RESERVE = 64  # descriptors kept free for a scrape's file reads, psutil and the pidfds
ACCEPT_BATCH = 64
ACCEPT_PAUSE = 0.1

_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def connection_cap(wanted: int = DEFAULT_MAX_CONNECTIONS) -> int:
    """`wanted`, lowered to leave FD_RESERVE descriptors free under this process's open-files limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, soft - FD_RESERVE))


@dataclass
class Request:
    method: str
    target: str  # origin-form, checked by _parse_head (_TARGET)
    version: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    tls: bool = False

    @property
    def path(self) -> str:
        """The target up to its query. Not urlsplit: it parses "//host/..." as an authority (and raised
        ValueError, a 500 with a traceback, on "//[") where an origin-form target has only a path."""
        return self.target.partition("?")[0]

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


def _error(status: HTTPStatus) -> Response:
    return Response(
        status, f"{status.value} {status.phrase}\n".encode(), [("Content-Type", "text/plain; charset=utf-8")]
    )


class _HeadError(Exception):
    def __init__(self, status: HTTPStatus) -> None:
        self.status = status


# Origin-form (RFC 9112 3.2.1): a path of RFC 3986 path characters, then optionally "?" and a query of
# visible ASCII (ignored here, so kept lenient). "//[" and the like are 400, never parsed any further.
# No space or control character anywhere: a bare LF or CR would end a line for some other parser, and what
# is echoed into a response header or a log line must not be able to start a new one.
_TARGET = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*(\?[\x21-\x7e]*)?")
_METHOD = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")  # a token (RFC 9110)
# A header value: HTAB, space, visible ASCII and obs-text (RFC 9110 field-value); no other control byte.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _parse_head(head: bytes) -> Request:
    """The request head (without its final blank line) as a Request; _HeadError for anything malformed."""
    lines = head.split(b"\r\n")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise _HeadError(HTTPStatus.BAD_REQUEST) from None
    well_formed = _METHOD.fullmatch(method) and _TARGET.fullmatch(target)
    if version not in ("HTTP/1.1", "HTTP/1.0") or not well_formed:
        raise _HeadError(HTTPStatus.BAD_REQUEST)
    if len(lines) - 1 > MAX_HEADERS:
        raise _HeadError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or _CONTROL.search(line):
            raise _HeadError(HTTPStatus.BAD_REQUEST)
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    return Request(method, target, version, headers)


class _Connection(asyncio.Protocol):
    """One client connection: reads one request at a time, answers it, keeps alive or closes."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None
        self.tls = False
        self.writing_paused = False  # the transport's buffer is above its high-water mark
        self.next_waits = False  # the next request waits for the buffer to drain (see _next_request)
        self.unsent = 0  # the buffer's size when the send timer was armed

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.tls = transport.get_extra_info("sslcontext") is not None
        self.server._register(self)
        self._arm(HEAD_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self.task is not None:  # pipelined bytes while busy: kept, bounded by MAX_HEAD
            self.buffer += data
            if len(self.buffer) > MAX_HEAD:
                self.abort()
            return
        if not self.buffer:
            self._arm(HEAD_TIMEOUT)  # the idle wait ended: the head must now arrive in time
        self.buffer += data
        self._try_request()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.next_waits:
            self.next_waits = False
            self._next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.task is not None:
            self.task.cancel()
        self.server._unregister(self)

    # -- the rest
    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _arm(self, seconds: float, then: Callable[[], None] | None = None) -> None:
        self._disarm()
        self.timer = self.server.loop.call_later(seconds, then or self.abort)

    def _watch_sending(self) -> None:
        """Close the connection unless the client takes some of the buffered response in SEND_TIMEOUT."""
        assert self.transport is not None
        self.unsent = self.transport.get_write_buffer_size()
        self._arm(self.server.send_timeout, self._check_sending)

    def _check_sending(self) -> None:
        assert self.transport is not None
        left = self.transport.get_write_buffer_size()
        if left and left >= self.unsent:
            self.abort()  # not a byte taken since the last check
        elif left:
            self._watch_sending()

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _try_request(self) -> None:
        first_line_end = self.buffer.find(b"\r\n")
        if first_line_end > MAX_REQUEST_LINE or (first_line_end < 0 and len(self.buffer) > MAX_REQUEST_LINE):
            self._fail(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end > MAX_HEAD or (end < 0 and len(self.buffer) > MAX_HEAD):
            self._fail(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            return
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        try:
            request = _parse_head(head)
        except _HeadError as err:
            self._fail(err.status)
            return
        request.tls = self.tls
        if request.header("transfer-encoding") or request.header("content-length", "0") != "0":
            self._fail(HTTPStatus.BAD_REQUEST)  # nothing here takes a body; do not read one
            return
        self._disarm()
        self.server._busy(self)
        assert self.transport is not None
        self.transport.pause_reading()
        self.task = self.server.loop.create_task(self._respond(request))

    def _fail(self, status: HTTPStatus) -> None:
        self._write(_error(status), head_only=False, keep_alive=False)

    async def _respond(self, request: Request) -> None:
        try:
            response = await self.server.handler(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("metrics request %s %s failed", request.method, request.target)
            response = _error(HTTPStatus.INTERNAL_SERVER_ERROR)
        connection = request.header("connection").lower()
        keep_alive = connection != "close" if request.version == "HTTP/1.1" else connection == "keep-alive"
        self.task = None
        self._write(response, head_only=request.method == "HEAD", keep_alive=keep_alive)
        if keep_alive and self.transport is not None and not self.transport.is_closing():
            self._next_request()

    def _next_request(self) -> None:
        """Read and parse the next request, unless the last response is still buffered above the mark.

        Then it waits for resume_writing: reading on (reading was paused for the request) let a client
        that pipelines requests and never reads the answers grow the buffer by one response per request,
        without bound (4-5 MB/s per peer with a 1.8 MB /metrics), and no idle or head timer ever fired.
        """
        assert self.transport is not None
        if self.writing_paused:
            self.next_waits = True
            self._watch_sending()
            return
        self.server._idle(self)
        self.transport.resume_reading()
        self._arm(IDLE_TIMEOUT if not self.buffer else HEAD_TIMEOUT)
        if self.buffer:
            self._try_request()

    def _write(self, response: Response, *, head_only: bool, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status = HTTPStatus(response.status)
        lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Content-Length: {len(response.body)}"]
        lines += [f"{name}: {value}" for name, value in (*response.headers, *self.server.extra_headers)]
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.transport.write(head if head_only else head + response.body)
        if not keep_alive:
            self.transport.close()  # after the buffered response is sent
            if self.transport.get_write_buffer_size():
                self._watch_sending()  # and not forever: a closing transport waits for the client


class HttpServer:
    """Serves `handler` on an already listening socket until `close()`."""

    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int | None = None,
        extra_headers: list[tuple[str, str]] | None = None,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.listener = listener
        self.listener.setblocking(False)
        self.handler = handler
        self.ssl_context = ssl_context
        self.max_connections = max_connections or connection_cap()
        self.extra_headers = extra_headers or []
        self.send_timeout = send_timeout
        self.connections: set[_Connection] = set()
        # Connections without a request in progress, oldest first: the ones to close when out of room.
        self.waiting: collections.OrderedDict[_Connection, None] = collections.OrderedDict()
        self.handshaking = 0
        self.accepting = False
        self.closed = False

    def start(self) -> None:
        self._resume_accepting()

    def close(self) -> None:
        self.closed = True
        self._pause_accepting()
        for connection in list(self.connections):
            connection.abort()

    @property
    def open_connections(self) -> int:
        return len(self.connections) + self.handshaking

    # -- accepting
    def _pause_accepting(self) -> None:
        if self.accepting:
            self.loop.remove_reader(self.listener.fileno())
            self.accepting = False

    def _resume_accepting(self) -> None:
        if not self.accepting and not self.closed:
            self.loop.add_reader(self.listener.fileno(), self._accept)
            self.accepting = True

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in _OUT_OF_DESCRIPTORS:
                    # Closing is completed by the loop on its next turn: resume accepting after that.
                    freed = self._close_longest_waiting()
                    self._pause_accepting()
                    if freed:
                        self.loop.call_soon(self._resume_accepting)
                    else:
                        self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
                    return
                continue  # ECONNABORTED and the like: that client is gone, try the next one
            if self.open_connections >= self.max_connections and not self._close_longest_waiting():
                sock.close()  # every connection has a request in progress: no room for this one
                continue
            sock.setblocking(False)
            self.handshaking += 1
            self.loop.create_task(self._connect(sock))

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: _Connection(self),
                sock,
                ssl=self.ssl_context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl_context else None,
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError):
            sock.close()  # a failed TLS handshake is the client's problem, not worth a log line
        finally:
            self.handshaking -= 1

    def _close_longest_waiting(self) -> bool:
        if not self.waiting:
            return False
        connection, _ = self.waiting.popitem(last=False)
        connection.abort()
        return True

    # -- bookkeeping called by connections
    def _register(self, connection: _Connection) -> None:
        self.connections.add(connection)
        self.waiting[connection] = None

    def _unregister(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        self.waiting.pop(connection, None)

    def _busy(self, connection: _Connection) -> None:
        self.waiting.pop(connection, None)

    def _idle(self, connection: _Connection) -> None:
        self.waiting[connection] = None
        self.waiting.move_to_end(connection)
