"""Zero-code HTTP metrics for any ASGI app, with starlette_exporter's metric names and labels.

The worker hook wraps the already-imported app once per worker process::

    worker.wsgi = PrometheusMiddleware(worker.wsgi, app_name=..., buckets=..., skip_paths=...)

Names, label names and help texts are starlette_exporter's, so dashboards built for it keep working:

- ``starlette_request_duration_seconds`` histogram (method, path, status_code, app_name)
- ``starlette_requests_in_progress`` gauge (method, app_name), summed over live workers
- ``starlette_requests_total`` counter (method, path, status_code, app_name) is *not* written here: it is
  exactly the histogram's ``_count`` per label set, so the metrics process derives it at scrape time
  (:mod:`gunicorn_prometheus.derived`).

Written through, exactly, at about the cost of nothing
------------------------------------------------------
Each request adds its duration and one bucket count straight into this worker's shared-memory cells
(:mod:`gunicorn_prometheus.cells`): the label set is resolved to its cells once (cached per route and
status), after which a request costs two float64 read-add-stores into a ``MAP_SHARED`` page, plus one
each way for the in-progress gauge. No file call, no lock, nothing batched: a scrape sees a request the
moment it is recorded, and a SIGKILL a microsecond later loses nothing. The request is recorded when the
app hands over its *final* body message, before the server sends it, so every response a client
received is already counted. (The batched version this replaces lost up to 0.1 s of requests on SIGKILL;
prometheus_client's ``Histogram.observe`` costs ~10 µs per request in multiprocess mode.)

Without ``PROMETHEUS_MULTIPROC_DIR`` (or ``directory=None``), the cells live in anonymous memory and the
middleware registers a collector for them in ``registry``, for apps served by one process.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import asgi, cells, names

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_BUCKETS: tuple[float, ...] = tuple(Histogram.DEFAULT_BUCKETS)

REQUEST_DURATION = names.REQUEST_DURATION
REQUESTS_IN_PROGRESS = names.REQUESTS_IN_PROGRESS
#: Not written by the middleware; derived at scrape time from the histogram's ``_count``.
REQUESTS_TOTAL = names.REQUESTS + "_total"
REQUEST_LABELS = names.REQUEST_LABELS
IN_PROGRESS_LABELS = names.IN_PROGRESS_LABELS

#: starlette_exporter's ``group_unhandled_paths`` placeholder: one series for every unrouted URL, so
#: scanners hitting random paths cannot create unbounded series.
UNKNOWN_PATH = "__unknown__"
#: Same reasoning for the method label (h11 accepts any token as a method); the name follows
#: OpenTelemetry's HTTP semantic conventions.
OTHER_METHOD = "_OTHER"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

#: Bound of the per-route lookup caches: their keys include ``root_path``, which varies per request
#: under a mount with path parameters, so they are emptied when they grow past this (the label sets
#: themselves are bounded by the routes).
_CACHE_MAX = 4096
_REGEX_CHARS = re.compile(r"[\\^$|?*+()\[\]{}]")

#: The clock of request durations; a module global so tests can substitute a fake one.
_clock = time.perf_counter


#: Requests between two checks for an OpenTelemetry tracer provider until one is set
#: (see PrometheusMiddleware._otel_provider_is_set).
_OTEL_RECHECK = 1000

#: A value no route, context or method is: the initial "last label set" matches no request.
_NOTHING = object()


class _Default:
    """Type of DEFAULT: "use PROMETHEUS_MULTIPROC_DIR" (None already means "no directory")."""


DEFAULT = _Default()


class _Store:
    """The cells of one process (and directory, or registry without one), shared by its middlewares."""

    def __init__(self, writer: cells.CellsWriter, buckets: tuple[float, ...]) -> None:
        self.writer = writer
        self.buckets = buckets
        #: bucket upper bounds plus +Inf, for bisect: index i is the row's cell base + 1 + i
        self.upper_bounds: list[float] = [*writer.bounds, float("inf")]


class _CellsCollector(Collector):
    """Serves one process's own cells from its registry (single-process use, no directory)."""

    def __init__(self, store: _Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        from .collector import http_families

        yield from http_families(cells.merge([self.store.writer.snapshot()]))

    def describe(self) -> Iterator[Metric]:
        return iter(self.collect())


_stores_lock = threading.Lock()
_stores_by_directory: dict[tuple[str, str, int], _Store] = {}
_stores_by_registry: weakref.WeakKeyDictionary[Any, _Store] = weakref.WeakKeyDictionary()
_NO_REGISTRY = CollectorRegistry(auto_describe=False)  # cache key standing for registry=None


def _forget_stores_after_fork() -> None:
    # A forked child must not write its parent's file (one writer per file): it opens its own on first use.
    _stores_by_directory.clear()


os.register_at_fork(after_in_child=_forget_stores_after_fork)


def _current_identity() -> str:
    from .slots import current_identity

    return current_identity()


def _store_for(
    registry: CollectorRegistry | None, buckets: tuple[float, ...], directory: str | None
) -> _Store:
    """Return this process's cells for ``directory`` (or for ``registry`` without one), created once.

    Several middlewares in one process (tests, or an app wrapped twice) share them: one file has one
    writer, and one registry cannot hold the same metric twice.
    """
    with _stores_lock:
        if directory:
            key = (os.path.abspath(directory), _current_identity(), os.getpid())
            store = _stores_by_directory.get(key)
            if store is None:
                writer = cells.CellsWriter(buckets, directory, key[1])
                store = _stores_by_directory[key] = _Store(writer, buckets)
        else:
            registry_key = registry if registry is not None else _NO_REGISTRY
            store = _stores_by_registry.get(registry_key)
            if store is None:
                store = _stores_by_registry[registry_key] = _Store(cells.CellsWriter(buckets), buckets)
                if registry is not None:
                    registry.register(_CellsCollector(store))
        if store.buckets != buckets:
            raise ValueError(
                f"{REQUEST_DURATION} already exists here with buckets {store.buckets}; "
                f"cannot also use {buckets}"
            )
        return store


def _compile_skip(skip_paths: Iterable[str]) -> tuple[frozenset[str], re.Pattern[str] | None]:
    """Split skip paths into exact paths (a set lookup) and regexes (one combined fullmatch).

    An entry with regex metacharacters (other than ``.``, common in real paths) is a regex matched
    against the whole path, as starlette_exporter's ``skip_paths`` are; any other entry is a path.
    """
    exact: set[str] = set()
    patterns: list[str] = []
    for path in skip_paths:
        if _REGEX_CHARS.search(path):
            patterns.append(f"(?:{path})")
        else:
            exact.add(path)
    return frozenset(exact), re.compile("|".join(patterns)) if patterns else None


def _match_template(scope: Scope, routes: Sequence[Any]) -> str | None:
    """Find the full route template (mount prefixes included) by matching, as starlette_exporter does.

    Only called on a cache miss. starlette_exporter's own matcher is preferred when installed, so the
    ``path`` label is exactly what its users' dashboards already hold.
    """
    matcher: Callable[[Any, Any], str | None] = _get_matching_route_path
    try:
        from starlette_exporter import middleware as exporter

        matcher = exporter.get_matching_route_path
    except ImportError:
        pass
    try:
        return matcher(scope, routes)
    except Exception:
        return None


def _get_matching_route_path(scope: Scope, routes: Sequence[Any], prefix: str | None = None) -> str | None:
    """starlette_exporter's matching (Starlette routes and mounts, FastAPI included routers)."""
    from starlette.routing import Match

    try:
        from fastapi.routing import iter_route_contexts

        candidates = [getattr(c, "starlette_route", None) or c for c in iter_route_contexts(routes)]
    except ImportError:
        candidates = list(routes)
    for route in candidates:
        match, child_scope = route.matches(scope)
        if match == Match.FULL:
            name = getattr(route, "path", None)
            child_routes = getattr(route, "routes", None)
            if child_routes:
                child_name = _get_matching_route_path({**scope, **child_scope}, child_routes, name)
                if child_name is None:
                    return None
                if name is None:
                    return child_name
                name += child_name
            return name
        if match == Match.PARTIAL and prefix is None:
            prefix = getattr(route, "path", None)
    return None


class PrometheusMiddleware:
    """Pure ASGI middleware recording request durations and in-flight requests.

    Not a ``BaseHTTPMiddleware``: that costs a quarter or more of a small app's throughput.

    ``requests_handled`` counts the HTTP requests this process has received (skipped paths included, as
    Uvicorn's ``limit_max_requests`` does); the worker_exit hook compares it with ``max_requests`` to tell
    a recycle from another exit.

    ``directory`` is where the cells file goes (default: ``PROMETHEUS_MULTIPROC_DIR``; ``None`` when it is
    unset: anonymous memory, served from ``registry``). ``exemplars``: keep the trace id of requests that
    carry a W3C ``traceparent`` header (or run in a current OpenTelemetry span) as the exemplar of the
    bucket they land in.

    ``in_flight``: the worker's :class:`gunicorn_prometheus.asgi.InFlight` around the same app. The
    middleware then counts the HTTP requests a stop cut itself (their cancellation ends here as it would
    in InFlight), and hands everything else (websockets, lifespan, skipped paths) to it: one layer on the
    request path instead of two.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        app_name: str = "starlette",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        skip_paths: Iterable[str] = (),
        registry: CollectorRegistry | None = prometheus_client.REGISTRY,
        directory: str | None | _Default = DEFAULT,
        exemplars: bool = True,
        in_flight: Any = None,
    ) -> None:
        self.app = app
        self._in_flight = in_flight
        #: where requests the middleware does not record go: the in-flight counter if any, else the app
        self._other: ASGIApp = in_flight if in_flight is not None else app
        self.app_name = app_name
        self.requests_handled = 0
        if isinstance(directory, _Default):
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self._store = _store_for(registry, tuple(float(b) for b in buckets), directory)
        self._skip_exact, self._skip_regex = _compile_skip(skip_paths)
        self._has_skips = bool(self._skip_exact) or self._skip_regex is not None
        # (method, status, id(route or endpoint), id(FastAPI route context), root_path after routing)
        #   -> (route, context, row)
        self._rows: dict[tuple[str, int, int, int, str], tuple[Any, Any, cells.HistogramRow]] = {}
        self._templates: dict[tuple[str, int, int, str], tuple[Any, Any, str]] = {}
        # method -> (method label, its in-progress cell's view and index); only known methods and
        # OTHER_METHOD are keys
        self._gauges: dict[str, tuple[str, memoryview[float], int]] = {}
        self._exemplars = exemplars
        # An app that uses OpenTelemetry has imported it by the time the worker wraps it.
        self._otel = sys.modules.get("opentelemetry.trace") if exemplars else None
        # Whether a tracer provider is set (see _otel_provider_is_set); until then, rechecked every
        # _OTEL_RECHECK requests, the first one included.
        self._otel_provider = False
        self._otel_countdown = 0
        # The last label set recorded and its row: (route, context, status, method, root_path, row).
        self._last: tuple[Any, ...] = (_NOTHING,) * 6
        # The writer's generation the caches were filled in (it changes when storage comes back).
        self._generation = self._store.writer.generation

    def __getattr__(self, name: str) -> Any:
        """Attributes the middleware lacks are the app's (see asgi.pass_through)."""
        if name == "app":  # not set yet: no recursion
            raise AttributeError(name)
        return asgi.pass_through(self.app, name)

    @property
    def cells_path(self) -> str | None:
        """The file this process's HTTP metrics go to (None: anonymous memory)."""
        return self._store.writer.path

    def _skipped(self, scope: Scope, root_path: str) -> bool:
        path: str = scope["path"]
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        if path in self._skip_exact:
            return True
        return self._skip_regex is not None and self._skip_regex.fullmatch(path) is not None

    def _gauge(self, method: str) -> tuple[str, memoryview[float], int]:
        """The method label and in-progress cell of a method not seen yet (any unknown one: _OTHER)."""
        if method not in KNOWN_METHODS:
            method = OTHER_METHOD
            known = self._gauges.get(method)
            if known is not None:
                return known
        cell = self._store.writer.in_progress((method, self.app_name))
        entry = self._gauges[method] = (method, cell.cells, cell.index)
        return entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        self.requests_handled += 1
        root_path: str = scope.get("root_path", "")
        if self._has_skips and self._skipped(scope, root_path):
            await self._other(scope, receive, send)
            return

        entry = self._gauges.get(scope["method"])
        if entry is None:
            entry = self._gauge(scope["method"])
        method, gauge_cells, gauge_index = entry
        gauge_cells[gauge_index] += 1
        in_flight = self._in_flight
        status = 0
        end = 0.0
        start = _clock()

        # A plain function returning send's awaitable: no extra coroutine per message. What it only reads
        # is bound as default values, not closed over: each name closed over is a cell object the request
        # allocates (and the garbage collector tracks), so only the two it writes are cells.
        def send_status(
            message: Message,
            send: Send = send,
            scope: Scope = scope,
            self: PrometheusMiddleware = self,
            method: str = method,
            root_path: str = root_path,
            start: float = start,
        ) -> Awaitable[None]:
            nonlocal status, end
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not end and not message.get("more_body", False):
                # The final body message: record the request now, before the server sends it, so a
                # client never holds a response the metrics do not count yet. Background tasks that
                # run after it are not part of the duration (starlette_exporter measures the same way).
                end = _clock()
                duration = end - start
                # Inlined (a method call costs as much as several of these lines): the row of the last
                # request's label set if this one has the same (identity checks are cheaper than building
                # and hashing the _rows cache's key), else through the caches; then sum, bucket, exemplar.
                route = scope.get("route")
                if route is None:
                    route = scope.get("endpoint")
                    if route is None:
                        route = scope.get("path_template")
                fastapi_scope = scope.get("fastapi")
                context = fastapi_scope.get("effective_route_context") if fastapi_scope else None
                routed_root_path = scope.get("root_path", "")
                last = self._last
                if (
                    last[0] is route
                    and last[1] is context
                    and last[2] == status
                    and last[3] is method
                    and last[4] == routed_root_path
                ):
                    row = last[5]
                else:
                    row = self._row_for(scope, root_path, method, status)
                    self._last = (route, context, status, method, routed_root_path, row)
                if row.exemplars < 0:  # the overflow row: storage failed (rare), see _unstored
                    row = self._unstored(scope, root_path, method, status, row)
                row_cells = row.cells
                base = row.base
                row_cells[base] += duration
                bucket = bisect_left(self._store.upper_bounds, duration)
                row_cells[base + 1 + bucket] += 1
                if self._exemplars:
                    # The exemplar's trace, if any: a plain loop is the cheapest scan (~50 ns a header;
                    # map/itemgetter or dict() cost more for the few headers requests carry).
                    for name, value in scope["headers"]:
                        if name == b"traceparent":
                            self._exemplar(_parse_traceparent(value), row, bucket, duration)
                            break
                    else:
                        if self._otel is not None:
                            if self._otel_provider:
                                self._exemplar(_current_otel_trace(self._otel), row, bucket, duration)
                            else:  # every request of an app that has opentelemetry-api but traces nothing
                                self._otel_countdown -= 1
                                if self._otel_countdown <= 0 and self._otel_provider_is_set():
                                    self._exemplar(_current_otel_trace(self._otel), row, bucket, duration)
            return send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            if in_flight is None:
                raise
            in_flight.cut += 1  # as InFlight does: the worker is stopping (see asgi.InFlight)
            return
        except Exception:
            if not end:  # no complete response: starlette_exporter counts a 500, so do we
                end = _clock()
                self._record(scope, root_path, method, 500, end - start)
            raise
        finally:
            gauge_cells[gauge_index] -= 1  # cancelled requests too: no longer in progress
        if not end:  # the app returned without completing a response
            if not status:
                status = await _status_without_response(receive)
            self._record(scope, root_path, method, status, _clock() - start)

    def _otel_provider_is_set(self) -> bool:
        """Whether an OpenTelemetry tracer provider is set (opentelemetry-api's public
        ``get_tracer_provider``): until one is, the current span is not looked up.

        FastAPI imports opentelemetry-api whenever it is installed, so an app can have it without tracing
        anything; looking the current span up then costs ~6,500 instructions per request for nothing
        (about 1 % of a Quick Start request). Without a provider, the API's spans are invalid unless a
        propagator made one current from an incoming header, which the W3C ``traceparent`` scan already
        covers; only another propagator's header (b3, say) without an SDK is missed. A provider set later
        (in the app's lifespan, say) is noticed within _OTEL_RECHECK requests.
        """
        self._otel_countdown = _OTEL_RECHECK
        otel: Any = self._otel
        try:
            self._otel_provider = not isinstance(otel.get_tracer_provider(), otel.ProxyTracerProvider)
        except Exception:
            self._otel_provider = False
        return self._otel_provider

    def _record(self, scope: Scope, root_path: str, method: str, status: int, duration: float) -> None:
        """The request path's recording, for the rare requests that end without a final body message."""
        row = self._row_for(scope, root_path, method, status)
        if row.exemplars < 0:
            row = self._unstored(scope, root_path, method, status, row)
        bucket = bisect_left(self._store.upper_bounds, duration)
        row.cells[row.base] += duration
        row.cells[row.base + 1 + bucket] += 1
        if self._exemplars:
            trace = None
            for name, value in scope.get("headers", ()):
                if name == b"traceparent":
                    trace = _parse_traceparent(value)
                    break
            else:
                if self._otel is not None and (self._otel_provider or self._otel_provider_is_set()):
                    trace = _current_otel_trace(self._otel)
            self._exemplar(trace, row, bucket, duration)

    def _unstored(
        self, scope: Scope, root_path: str, method: str, status: int, row: cells.HistogramRow
    ) -> cells.HistogramRow:
        """A request whose label set got the overflow row (storage full, or no file): the row to record
        it in, and the request counted as a write error where a scrape sees it.

        Once the writer's retry interval has passed, the cached rows and gauge cells are forgotten and
        this label set is asked for again, so counting by label resumes once there is room (the writer
        tries the disk at most once per interval, however many requests ask). Until then, when the
        overflow row is not in a file (the file could not be created), each request is counted in the
        shared table instead.
        """
        writer = self._store.writer
        if writer.retry_due() or writer.generation != self._generation:
            self._generation = writer.generation
            self._rows.clear()
            self._gauges.clear()  # requests in flight keep the cell they incremented
            self._last = (_NOTHING,) * 6  # the next request goes through the (refilled) caches
            row = self._row_for(scope, root_path, method, status)
            if row.exemplars >= 0:
                return row
        writer.count_unstored()
        return row

    @staticmethod
    def _exemplar(
        trace: tuple[int, int, int] | None, row: cells.HistogramRow, bucket: int, duration: float
    ) -> None:
        """Keep the request's trace (trace id high, low, span id) as the bucket's exemplar, if it has one."""
        if trace is not None:
            cells.write_exemplar(row, bucket, duration, time.time(), *trace)

    def _row_for(self, scope: Scope, root_path: str, method: str, status: int) -> cells.HistogramRow:
        """The cells of a request's label set, through the route caches (the request path inlines the hit)."""
        route = scope.get("route")
        if route is None:
            route = scope.get("endpoint")
            if route is None:
                route = scope.get("path_template")
        fastapi_scope = scope.get("fastapi")
        context = fastapi_scope.get("effective_route_context") if fastapi_scope else None
        key = (method, status, id(route), id(context), scope.get("root_path", ""))
        cached = self._rows.get(key)
        if cached is not None and cached[0] is route and cached[1] is context:
            return cached[2]
        path = self._template(scope, method, root_path, route, context)
        row = self._store.writer.histogram((method, path, str(status), self.app_name))
        if len(self._rows) >= _CACHE_MAX:
            self._rows.clear()
        self._rows[key] = (route, context, row)
        return row

    def _template(self, scope: Scope, method: str, root_path: str, route: Any, context: Any) -> str:
        """The full route template of a routed request, found by matching once per route.

        After routing, Starlette and FastAPI leave the matched route in ``scope["route"]`` (FastAPI's
        router leaves a mounted app in ``scope["endpoint"]`` instead), but only the innermost one, whose
        own path lacks mount and include_router prefixes. So the template is found by matching again and
        cached under what identifies it: the route object, FastAPI's effective route context (one per
        include_router inclusion), the root path (one per mount) and the method (a route matched with
        the wrong method is a partial match, a 405, which starlette_exporter counts as unknown). Route
        objects are unhashable (they define ``__eq__``), hence ids checked against the cached objects.
        Litestar leaves the full template in ``scope["path_template"]`` (what its own Prometheus
        middleware labels by), one string object per route: it stands for the route itself.
        """
        if route is None:
            return UNKNOWN_PATH
        key = (method, id(route), id(context), scope.get("root_path", ""))
        cached = self._templates.get(key)
        if cached is not None and cached[0] is route and cached[1] is context:
            return cached[2]
        template = _resolve(scope, root_path)
        if len(self._templates) >= _CACHE_MAX:
            self._templates.clear()
        self._templates[key] = (route, context, template)
        return template


def _resolve(scope: Scope, root_path: str) -> str:
    """Match the request again from the top, on a copy of its scope as it was before routing.

    An empty template is a real one, as in starlette_exporter: a mount at "/" (StaticFiles serving a
    single-page app, say) has the path "".
    """
    router = scope.get("router")
    if router is None or not getattr(router, "routes", None):
        template = getattr(scope.get("route"), "path", None)
        if template is None and isinstance(scope.get("path_template"), str):
            template = scope["path_template"]  # Litestar's
    else:
        dropped = ("route", "endpoint", "path_params", "app_root_path", "fastapi")
        original = {key: value for key, value in scope.items() if key not in dropped}
        original["root_path"] = root_path
        template = _match_template(original, router.routes)
    return UNKNOWN_PATH if template is None else template


_TRACEPARENT_RE = re.compile(rb"[0-9a-f]{2}-([0-9a-f]{16})([0-9a-f]{16})-([0-9a-f]{16})-[0-9a-f]{2}")


def _parse_traceparent(value: bytes) -> tuple[int, int, int] | None:
    """(trace id high, trace id low, span id) of a W3C ``traceparent`` value; None if it is not valid.

    https://www.w3.org/TR/trace-context/#traceparent-header: version ``ff`` and all-zero ids are invalid;
    a future version may append fields after the flags.
    """
    match = _TRACEPARENT_RE.match(value)
    if match is None or value.startswith(b"ff") or (len(value) > 55 and value[55:56] != b"-"):
        return None
    high, low, span = int(match[1], 16), int(match[2], 16), int(match[3], 16)
    if not (high or low) or not span:
        return None
    return high, low, span


def _current_otel_trace(otel_trace: Any) -> tuple[int, int, int] | None:
    """The current OpenTelemetry span's ids, if one is recording (opentelemetry-api's public API)."""
    try:
        context = otel_trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return context.trace_id >> 64, context.trace_id & 0xFFFFFFFFFFFFFFFF, context.span_id
    except Exception:
        return None


async def _status_without_response(receive: Receive) -> int:
    """Status for an app that returned without responding: 499 if the client went away, else 500.

    Same rule as starlette_exporter; the check must not block, hence the immediately cancelled scope.
    """
    try:
        import anyio

        message: Message = {}
        with anyio.CancelScope() as cancel_scope:
            cancel_scope.cancel()
            message = await receive()
        return 499 if message.get("type") == "http.disconnect" else 500
    except Exception:
        return 500
