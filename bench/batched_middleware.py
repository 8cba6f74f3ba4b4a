"""BENCH ONLY: the batched HTTP middleware that gunicorn_prometheus shipped before the shared-memory cells.

Kept here, unchanged but for this paragraph, so bench/throughput can print it ("ours-batched") beside
the write-through middleware and show what the change costs or saves. It writes into prometheus_client's
private histogram internals (``_sum``, ``_buckets``, ``_upper_bounds``), which the package no longer does:
never import this from the package.

Zero-code HTTP metrics for any ASGI app, with starlette_exporter's metric names and labels.

The worker hook wraps the already-imported app once per worker process::

    worker.wsgi = PrometheusMiddleware(worker.wsgi, app_name=..., buckets=..., skip_paths=...)

Names, label names and help texts are starlette_exporter's, so dashboards built for it keep working:

- ``starlette_request_duration_seconds`` histogram (method, path, status_code, app_name)
- ``starlette_requests_in_progress`` gauge (method, app_name), multiprocess mode ``livesum``
- ``starlette_requests_total`` counter (method, path, status_code, app_name) is *not* written here: it is
  exactly the histogram's ``_count`` per label set, so the metrics process derives it at scrape time
  (:mod:`gunicorn_prometheus.derived`).

Why the request path writes no metric file at all
--------------------------------------------------
Measured with callgrind on the Quick Start app under uvloop (bench/throughput measures the same with wrk),
one request costs ~776k instructions. Through prometheus_client's public API, ``Histogram.observe`` in
multiprocess mode costs ~18k of them (two ``MmapedValue.inc``: lock, pid check, key lookup, mmap pack,
plus the Python-level bucket loop), and the in-progress gauge's inc and dec are two more such writes:
with the rest of the middleware, a first version cost ~39k (5.1 %, the whole budget). So the request
path only adds to plain Python numbers
(the sum, one bucket counter found by ``bisect``, an in-flight count), and ``flush()`` hands the
differences to the normal metric objects (``MmapedValue.inc``/``Gauge.set``) at most every
``flush_interval`` seconds, from a timer on the event loop: one write per changed value per interval,
however many requests. Consequences, all bounded by ``flush_interval`` (0.1 s by default, far below any
scrape interval): a scrape may miss the last fraction of a second of requests, and a worker killed with
SIGKILL loses that much; a normal exit flushes (``atexit``, and the worker_exit hook may call ``flush``).
``flush_interval=0`` writes through on every request instead.
This version costs ~18-21k instructions per request (2.3-2.7 %), ~1.6 µs on this machine, of which ~0.6 µs is
the bare minimum of any middleware that reads the status (wrapping ``send``, two clock reads).
"""

from __future__ import annotations

import asyncio
import atexit
import re
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_BUCKETS: tuple[float, ...] = tuple(Histogram.DEFAULT_BUCKETS)
DEFAULT_FLUSH_INTERVAL = 0.1

REQUEST_DURATION = "starlette_request_duration_seconds"
REQUESTS_IN_PROGRESS = "starlette_requests_in_progress"
#: Not written by the middleware; derived at scrape time from the histogram's ``_count``.
REQUESTS_TOTAL = "starlette_requests_total"
REQUEST_LABELS = ("method", "path", "status_code", "app_name")
IN_PROGRESS_LABELS = ("method", "app_name")

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


class _Series:
    """One label set of the histogram: its pending observations and what was written so far.

    ``values`` is ``[sum, count in bucket 0, count in bucket 1, ...]`` with non-cumulative buckets, as
    prometheus_client stores them; the request path only adds to it.
    """

    __slots__ = ("child", "values", "written")

    def __init__(self, child: Histogram, n_buckets: int) -> None:
        self.child = child
        self.values: list[float] = [0.0] * (n_buckets + 1)
        self.written: list[float] = [0.0] * (n_buckets + 1)

    def flush(self) -> None:
        values = self.values.copy()  # a snapshot: what is added meanwhile waits for the next flush
        written = self.written
        if values == written:
            return
        # Histogram children expose no public "add n observations": write to the very value objects
        # observe() uses (prometheus_client <0.27 is pinned; tests/unit/test_instrumentation.py checks it).
        child: Any = self.child
        delta = values[0] - written[0]
        if delta:
            child._sum.inc(delta)
        buckets = child._buckets
        for index in range(1, len(values)):
            delta = values[index] - written[index]
            if delta:
                buckets[index - 1].inc(delta)
        self.written = values

    def add(self, duration: float, upper_bounds: Sequence[float]) -> None:
        self.values[0] += duration
        self.values[bisect_left(upper_bounds, duration) + 1] += 1


class _Metrics:
    """The metric objects of one registry and their pending values, shared by its middlewares.

    Created once per process on first use (never at import, which would be in the gunicorn master);
    only ever touched from the event loop's thread, except by ``flush`` at interpreter exit.
    """

    def __init__(self, registry: CollectorRegistry | None, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.duration = Histogram(
            REQUEST_DURATION,
            "HTTP request duration, in seconds",
            REQUEST_LABELS,
            buckets=buckets,
            registry=registry,
        )
        self.upper_bounds: list[float] = list(self.duration._upper_bounds)  # buckets + [+Inf]
        self.gauge = Gauge(
            REQUESTS_IN_PROGRESS,
            "Total HTTP requests currently in progress",
            IN_PROGRESS_LABELS,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.series: dict[tuple[str, str, int, str], _Series] = {}
        self.in_progress: dict[tuple[str, str], int] = {}
        self._gauge_written: dict[tuple[str, str], int] = {}
        self._gauge_children: dict[tuple[str, str], Gauge] = {}
        self.flush_interval = DEFAULT_FLUSH_INTERVAL
        #: perf_counter time after which a request must (re)arm the flush timer: 0 when none is armed,
        #: and a timer that never fired (its loop was closed) is re-armed two intervals later.
        self.rearm_after = 0.0
        self._lock = threading.Lock()

    def series_for(self, method: str, path: str, status: int, app_name: str) -> _Series:
        key = (method, path, status, app_name)
        series = self.series.get(key)
        if series is None:
            child = self.duration.labels(method, path, str(status), app_name)
            series = self.series[key] = _Series(child, len(self.upper_bounds))
        return series

    def arm(self, now: float) -> None:
        """Make sure a flush happens within ``flush_interval``: a timer on the running loop."""
        if self.flush_interval <= 0:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no asyncio loop (e.g. trio): write through
            self.flush()
            return
        self.rearm_after = now + 2 * self.flush_interval
        loop.call_later(self.flush_interval, self.flush)

    def flush(self) -> None:
        """Write every pending change to the metric objects (and so to this process's files)."""
        with self._lock:
            self.rearm_after = 0.0
            for series in list(self.series.values()):
                series.flush()
            written = self._gauge_written
            for key, count in list(self.in_progress.items()):
                if written.get(key) != count:
                    child = self._gauge_children.get(key)
                    if child is None:
                        child = self._gauge_children[key] = self.gauge.labels(*key)
                    child.set(count)
                    written[key] = count


_metrics_lock = threading.Lock()
_metrics_by_registry: weakref.WeakKeyDictionary[Any, _Metrics] = weakref.WeakKeyDictionary()
_NO_REGISTRY = CollectorRegistry(auto_describe=False)  # cache key standing for registry=None


def _metrics_for(registry: CollectorRegistry | None, buckets: tuple[float, ...]) -> _Metrics:
    """Return the process-wide metrics of ``registry``, creating them at most once.

    Several middlewares in one process (tests, or an app wrapped twice) must share the metric objects:
    prometheus_client refuses to register the same name twice.
    """
    key = registry if registry is not None else _NO_REGISTRY
    with _metrics_lock:
        metrics = _metrics_by_registry.get(key)
        if metrics is None:
            metrics = _metrics_by_registry[key] = _Metrics(registry, buckets)
        elif metrics.buckets != buckets:
            raise ValueError(
                f"{REQUEST_DURATION} already exists in this registry with buckets {metrics.buckets}; "
                f"cannot also use {buckets}"
            )
        return metrics


@atexit.register
def flush_all() -> None:
    """Write what every middleware of this process still holds (a worker's normal exit runs this)."""
    with _metrics_lock:
        everything = list(_metrics_by_registry.values())
    for metrics in everything:
        metrics.flush()


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
    try:
        from starlette_exporter.middleware import get_matching_route_path
    except ImportError:
        get_matching_route_path = _get_matching_route_path
    try:
        return get_matching_route_path(scope, routes)
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
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        app_name: str = "starlette",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        skip_paths: Iterable[str] = (),
        registry: CollectorRegistry | None = prometheus_client.REGISTRY,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self.app = app
        self.app_name = app_name
        self.requests_handled = 0
        self._metrics = _metrics_for(registry, tuple(float(b) for b in buckets))
        self._metrics.flush_interval = flush_interval
        self._skip_exact, self._skip_regex = _compile_skip(skip_paths)
        self._has_skips = bool(self._skip_exact) or self._skip_regex is not None
        # (method, status, id(route or endpoint), id(FastAPI route context), root_path after routing)
        #   -> (route, context, series)
        self._series: dict[tuple[str, int, int, int, str], tuple[Any, Any, _Series]] = {}
        self._templates: dict[tuple[str, int, int, str], tuple[Any, Any, str]] = {}
        # method -> the in-progress key, doubling as the check that the method is a known one
        self._progress_keys = {m: (m, app_name) for m in (*KNOWN_METHODS, OTHER_METHOD)}

    def flush(self) -> None:
        """Write pending values now (worker_exit; tests before reading the registry)."""
        self._metrics.flush()

    def _skipped(self, scope: Scope, root_path: str) -> bool:
        path: str = scope["path"]
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        if path in self._skip_exact:
            return True
        return self._skip_regex is not None and self._skip_regex.fullmatch(path) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.requests_handled += 1
        root_path: str = scope.get("root_path", "")
        if self._has_skips and self._skipped(scope, root_path):
            await self.app(scope, receive, send)
            return

        method: str = scope["method"]
        progress_key = self._progress_keys.get(method)
        if progress_key is None:
            method = OTHER_METHOD
            progress_key = self._progress_keys[method]
        metrics = self._metrics
        in_progress = metrics.in_progress
        in_progress[progress_key] = in_progress.get(progress_key, 0) + 1  # a series once a method is seen
        status = 0
        end = 0.0

        def send_status(message: Message) -> Awaitable[None]:
            # A plain function returning send's awaitable: no extra coroutine per message.
            nonlocal status, end
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not message.get("more_body", False):
                # The response is complete; background tasks that run after it are not part of the
                # request's duration (starlette_exporter measures the same way).
                end = time.perf_counter()
            return send(message)

        start = time.perf_counter()
        if start >= metrics.rearm_after:
            metrics.arm(start)
        try:
            await self.app(scope, receive, send_status)
        except Exception:
            in_progress[progress_key] -= 1
            self._series_for(scope, root_path, method, 500).add(
                (end or time.perf_counter()) - start, metrics.upper_bounds
            )
            if start >= metrics.rearm_after:
                metrics.arm(start)
            raise
        except BaseException:  # cancelled: not a response, but no longer in progress either
            in_progress[progress_key] -= 1
            raise
        in_progress[progress_key] -= 1
        if not status:
            status = await _status_without_response(receive)
        if not end:
            end = time.perf_counter()

        # The series of this route and status: one dict lookup, keyed by what routing left in the scope.
        route = scope.get("route")
        if route is None:
            route = scope.get("endpoint")
        fastapi_scope = scope.get("fastapi")
        context = fastapi_scope.get("effective_route_context") if fastapi_scope else None
        cached = self._series.get((method, status, id(route), id(context), scope.get("root_path", "")))
        if cached is not None and cached[0] is route and cached[1] is context:
            values = cached[2].values
        else:
            values = self._series_for(scope, root_path, method, status).values
        duration = end - start
        values[0] += duration
        values[bisect_left(metrics.upper_bounds, duration) + 1] += 1
        if end >= metrics.rearm_after:
            metrics.arm(end)

    def _series_for(self, scope: Scope, root_path: str, method: str, status: int) -> _Series:
        """The series of a request, through the route caches (the request path inlines the hit)."""
        route = scope.get("route")
        if route is None:
            route = scope.get("endpoint")
        fastapi_scope = scope.get("fastapi")
        context = fastapi_scope.get("effective_route_context") if fastapi_scope else None
        key = (method, status, id(route), id(context), scope.get("root_path", ""))
        cached = self._series.get(key)
        if cached is not None and cached[0] is route and cached[1] is context:
            return cached[2]
        path = self._template(scope, method, root_path, route, context)
        series = self._metrics.series_for(method, path, status, self.app_name)
        if len(self._series) >= _CACHE_MAX:
            self._series.clear()
        self._series[key] = (route, context, series)
        return series

    def _template(self, scope: Scope, method: str, root_path: str, route: Any, context: Any) -> str:
        """The full route template of a routed request, found by matching once per route.

        After routing, Starlette and FastAPI leave the matched route in ``scope["route"]`` (FastAPI's
        router leaves a mounted app in ``scope["endpoint"]`` instead), but only the innermost one, whose
        own path lacks mount and include_router prefixes. So the template is found by matching again and
        cached under what identifies it: the route object, FastAPI's effective route context (one per
        include_router inclusion), the root path (one per mount) and the method (a route matched with
        the wrong method is a partial match, a 405, which starlette_exporter counts as unknown). Route
        objects are unhashable (they define ``__eq__``), hence ids checked against the cached objects.
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
    """Match the request again from the top, on a copy of its scope as it was before routing."""
    router = scope.get("router")
    if router is None or not getattr(router, "routes", None):
        return getattr(scope.get("route"), "path", None) or UNKNOWN_PATH
    dropped = ("route", "endpoint", "path_params", "app_root_path", "fastapi")
    original = {key: value for key, value in scope.items() if key not in dropped}
    original["root_path"] = root_path
    return _match_template(original, router.routes) or UNKNOWN_PATH


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
