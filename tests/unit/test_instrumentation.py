"""PrometheusMiddleware: starlette_exporter's names and labels, bounded label values, written through."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram

from gunicorn_prometheus import cells, instrumentation, shared_state
from gunicorn_prometheus.collector import MultiProcessDirCollector
from gunicorn_prometheus.instrumentation import (
    OTHER_METHOD,
    UNKNOWN_PATH,
    PrometheusMiddleware,
)
from tests.support.apps import Boom, make_app
from tests.support.child import run_python

DURATION = "starlette_request_duration_seconds"


class FakeClock:
    """Stands in for the middleware's perf_counter: time moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


FAKE_CLOCK = FakeClock()


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    monkeypatch.setattr(instrumentation, "_clock", FAKE_CLOCK)
    return FAKE_CLOCK


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def get_all(app: Any, *paths: str, method: str = "GET") -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [(await client.request(method, path)).status_code for path in paths]


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples named ``name``, keyed by their sorted labels (``le`` left out of the key only if absent)."""
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def counts(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    """(method, path, status_code) -> requests counted, from the histogram's _count."""
    return {
        (labels["method"], labels["path"], labels["status_code"]): value
        for key, value in samples(registry, DURATION + "_count").items()
        for labels in [dict(key)]
        if value
    }


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def middleware(registry: CollectorRegistry) -> PrometheusMiddleware:
    return PrometheusMiddleware(make_app(), app_name="demo", registry=registry, skip_paths=["/healthz"])


def test_path_label_is_the_route_template_including_mounts_and_routers(middleware, registry):
    statuses = run(
        get_all(
            middleware,
            "/items/5?q=x",
            "/items/6",
            "/v1/api/users/7",
            "/v1/api/inner/x/3",
            "/sub/things/9",
            "/star/r/1",
            "/star/m/2/leaf",
            "/star/m/3/leaf",
        )
    )
    assert statuses == [200] * 8
    assert counts(registry) == {
        ("GET", "/items/{item_id}", "200"): 2,
        ("GET", "/v1/api/users/{user_id}", "200"): 1,
        ("GET", "/v1/api/inner/x/{y}", "200"): 1,
        ("GET", "/sub/things/{thing_id}", "200"): 1,
        ("GET", "/star/r/{a}", "200"): 1,
        ("GET", "/star/m/{b}/leaf", "200"): 2,
    }
    app_names = {dict(k)["app_name"] for k in samples(registry, DURATION + "_count")}
    assert app_names == {"demo"}


def test_unrouted_requests_share_one_series(middleware, registry):
    paths = [f"/scan/{i}/wp-login.php" for i in range(200)] + ["/sub/nope", "/items/"]
    statuses = run(get_all(middleware, *paths))
    assert set(statuses) == {404}
    assert counts(registry) == {("GET", UNKNOWN_PATH, "404"): len(paths)}


def test_an_app_mounted_at_the_root_has_starlette_exporters_empty_template(registry):
    """A single-page app's usual set-up: API routes, then StaticFiles mounted at "/" for the rest.
    starlette_exporter's template for what the mount serves is "" (the mount's own path); a served file
    must not look like an unrouted request."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def files(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("file")(scope, receive, send)

    app = Starlette(routes=[Route("/api/ping", lambda request: PlainTextResponse("pong")), Mount("/", files)])
    middleware = PrometheusMiddleware(app, registry=registry)
    assert run(get_all(middleware, "/api/ping", "/index.html", "/assets/app.js")) == [200] * 3
    assert counts(registry) == {("GET", "/api/ping", "200"): 1, ("GET", "", "200"): 2}
    exporter = pytest.importorskip("starlette_exporter.middleware")
    scope = {"type": "http", "method": "GET", "path": "/index.html", "root_path": "", "headers": []}
    assert exporter.get_matching_route_path(scope, app.router.routes) == ""


def test_litestar_routes_are_labelled_by_their_path_template(registry):
    """Litestar's router leaves the matched route's template in ``scope["path_template"]`` (one string
    object per route; none on a 404). A router of the same shape stands in for it here (Litestar is not a
    test dependency); the real Litestar 2 gave the same labels by hand, 2026-11-28: /items/{item_id},
    /v1/items/{item_id}, both templates of a handler with two paths, __unknown__ for a 404."""
    templates = {
        "/items/1": "/items/{item_id}",
        "/items/2": "/items/{item_id}",
        "/v1/items/3": "/v1/items/{item_id}",
    }
    interned = {template: template for template in templates.values()}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        template = templates.get(scope["path"])
        if template is not None:
            scope["path_template"] = interned[template]
        status = 404 if template is None else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = PrometheusMiddleware(app, registry=registry)
    statuses = run(get_all(middleware, "/items/1", "/items/2", "/v1/items/3", "/nope", "/items/1"))
    assert statuses == [200, 200, 200, 404, 200]
    assert counts(registry) == {
        ("GET", "/items/{item_id}", "200"): 3,
        ("GET", "/v1/items/{item_id}", "200"): 1,
        ("GET", UNKNOWN_PATH, "404"): 1,
    }


def test_wrong_method_is_unknown_like_starlette_exporter_and_does_not_poison_the_cache(middleware, registry):
    assert run(get_all(middleware, "/items/5", method="POST")) == [405]
    assert run(get_all(middleware, "/items/5")) == [200]
    assert run(get_all(middleware, "/items/5", method="POST")) == [405]
    assert counts(registry) == {("POST", UNKNOWN_PATH, "405"): 2, ("GET", "/items/{item_id}", "200"): 1}


def test_unusual_methods_are_grouped(middleware, registry):
    assert run(get_all(middleware, "/items/5", method="FROBNICATE")) == [405]
    assert counts(registry) == {(OTHER_METHOD, UNKNOWN_PATH, "405"): 1}


def test_exception_counts_as_500_and_propagates(middleware, registry):
    with pytest.raises(Boom):
        run(get_all(middleware, "/boom"))
    assert counts(registry) == {("GET", "/boom", "500"): 1}
    assert samples(registry, "starlette_requests_in_progress") == {
        (("app_name", "demo"), ("method", "GET")): 0.0
    }


def test_skip_paths_exact_and_regex(registry):
    app = PrometheusMiddleware(
        make_app(), registry=registry, skip_paths=["/healthz", "/static/.*", "/nowhere.txt"]
    )
    statuses = run(get_all(app, "/healthz", "/static/a.css", "/nowhere.txt", "/nowhereXtxt", "/items/1"))
    assert statuses == [200, 200, 404, 404, 200]
    # "." is literal in a path without other regex characters: /nowhereXtxt is counted.
    assert counts(registry) == {("GET", UNKNOWN_PATH, "404"): 1, ("GET", "/items/{item_id}", "200"): 1}
    assert app.requests_handled == 5  # skipped requests are still requests the worker handled


def test_non_http_scopes_pass_straight_through(registry):
    seen: list[str] = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    middleware = PrometheusMiddleware(app, registry=registry)
    run(middleware({"type": "lifespan"}, None, None))
    run(middleware({"type": "websocket", "path": "/ws"}, None, None))
    assert seen == ["lifespan", "websocket"]
    assert middleware.requests_handled == 0
    assert counts(registry) == {}


def test_lifespan_reaches_the_app(registry):
    events: list[str] = []
    app = make_app()
    app.router.on_startup.append(lambda: events.append("startup"))
    middleware = PrometheusMiddleware(app, registry=registry)
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return next(incoming)

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])

    run(middleware({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
    assert events == ["startup"]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert middleware.requests_handled == 0


def test_in_progress_gauge_counts_requests_in_flight(registry):
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(scope, receive, send):
        started.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = PrometheusMiddleware(slow, registry=registry, app_name="slow")
    gauge = "starlette_requests_in_progress"
    key = (("app_name", "slow"), ("method", "GET"))

    async def scenario() -> tuple[float, float]:
        request = asyncio.create_task(get_all(middleware, "/x"))
        await started.wait()
        during = samples(registry, gauge)[key]
        release.set()
        await request
        return during, samples(registry, gauge)[key]

    assert run(scenario()) == (1.0, 0.0)


def test_histogram_matches_plain_observe(registry, fake_clock):
    """Cells give exactly what prometheus_client's Histogram.observe gives for the same durations."""
    durations = [0.001, 0.004, 0.005, 0.02, 0.02, 0.3, 2.0, 10.0, 50.0]
    seen: list[int] = []

    async def timed(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        fake_clock.advance(durations[len(seen)])
        seen.append(1)
        await send({"type": "http.response.body", "body": b""})

    middleware = PrometheusMiddleware(timed, registry=registry)
    run(get_all(middleware, *["/x"] * len(durations)))

    reference = CollectorRegistry()
    histogram = Histogram(DURATION, "d", ["method", "path", "status_code", "app_name"], registry=reference)
    for d in durations:
        histogram.labels("GET", UNKNOWN_PATH, "200", "starlette").observe(d)
    for suffix in ("_bucket", "_count", "_sum"):
        assert samples(registry, DURATION + suffix) == pytest.approx(samples(reference, DURATION + suffix))


def test_duration_excludes_background_tasks(registry, fake_clock):
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def later(request: Any) -> PlainTextResponse:
        return PlainTextResponse("sent", background=BackgroundTask(fake_clock.advance, 100.0))

    middleware = PrometheusMiddleware(Starlette(routes=[Route("/later", later)]), registry=registry)
    before = fake_clock.now
    run(get_all(middleware, "/later"))
    assert fake_clock.now == before + 100  # the background task "took" 100 s...
    (total,) = samples(registry, DURATION + "_sum").values()
    assert total == 0.0  # ...after the request was recorded


def test_app_returning_without_response_counts_500(registry):
    async def silent(scope, receive, send):
        return None

    middleware = PrometheusMiddleware(silent, registry=registry)
    run(middleware({"type": "http", "method": "GET", "path": "/", "root_path": ""}, _no_message, None))
    assert counts(registry) == {("GET", UNKNOWN_PATH, "500"): 1}


async def _no_message() -> dict[str, Any]:
    await asyncio.sleep(10)
    return {}


def test_requests_handled_counts_http_requests(middleware):
    run(get_all(middleware, "/items/1", "/nope", "/healthz"))
    assert middleware.requests_handled == 3


def test_several_middlewares_share_one_registry(registry):
    first = PrometheusMiddleware(make_app(), registry=registry, app_name="a")
    second = PrometheusMiddleware(make_app(), registry=registry, app_name="b")
    run(get_all(first, "/items/1"))
    run(get_all(second, "/items/1", "/items/2"))
    by_app = {dict(k)["app_name"]: v for k, v in samples(registry, DURATION + "_count").items()}
    assert by_app == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="buckets"):
        PrometheusMiddleware(make_app(), registry=registry, buckets=[1, 2, 3])


def test_buckets_are_configurable(registry):
    middleware = PrometheusMiddleware(make_app(), registry=registry, buckets=[0.5, 1])
    run(get_all(middleware, "/items/1"))
    les = {dict(k)["le"] for k in samples(registry, DURATION + "_bucket")}
    assert les == {"0.5", "1.0", "+Inf"}


STARLETTE_EXPORTER_BUCKETS = """
import asyncio, json
import httpx
from prometheus_client import REGISTRY
from starlette_exporter import PrometheusMiddleware
from tests.support.apps import make_app

async def main():
    transport = httpx.ASGITransport(app=PrometheusMiddleware(make_app()))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/items/1")

asyncio.run(main())
buckets = [s for f in REGISTRY.collect() for s in f.samples if s.name.endswith("duration_seconds_bucket")]
print(json.dumps(sorted({s.labels["le"] for s in buckets})))
"""


def test_default_buckets_are_starlette_exporters(registry):
    """Served with no buckets given, the histogram has starlette_exporter's bucket bounds (drop-in).

    starlette_exporter registers in the global registry: it runs in a child so this process's stays clean.
    """
    pytest.importorskip("starlette_exporter")
    theirs = set(json.loads(run_python(STARLETTE_EXPORTER_BUCKETS)))
    assert len(theirs) > 2
    middleware = PrometheusMiddleware(make_app(), registry=registry)
    run(get_all(middleware, "/items/1"))
    assert {dict(k)["le"] for k in samples(registry, DURATION + "_bucket")} == theirs


def test_no_metric_is_created_at_import():
    code = (
        "import prometheus_client, gunicorn_prometheus.instrumentation as i\n"
        "print([m.name for m in prometheus_client.REGISTRY.collect() if m.name.startswith('starlette')])"
    )
    assert run_python(code).strip() == "[]"


@pytest.mark.parametrize(
    "path",
    ["/items/5", "/v1/api/users/7", "/v1/api/inner/x/3", "/sub/things/9", "/star/m/2/leaf", "/sub/nope"],
)
def test_fallback_matcher_agrees_with_starlette_exporter(path):
    exporter = pytest.importorskip("starlette_exporter.middleware")
    app = make_app()
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    expected = exporter.get_matching_route_path(dict(scope), app.router.routes)
    assert instrumentation._get_matching_route_path(dict(scope), app.router.routes) == expected


MULTIPROCESS_CHILD = """
import asyncio, sys
import httpx
from tests.support.apps import make_app
from gunicorn_prometheus.instrumentation import PrometheusMiddleware

middleware = PrometheusMiddleware(make_app(), app_name="mp")

async def main():
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for path in ["/items/1", "/items/2", "/v1/api/users/3", "/nope"]:
            await client.get(path)

asyncio.run(main())
# nothing to flush: each request is in the file once its response is handed over
"""


def _aggregate(directory: Path) -> dict[str, Any]:
    code = """
        import json, sys
        from gunicorn_prometheus.collector import MultiProcessDirCollector
        from gunicorn_prometheus.derived import derive_request_totals
        families = derive_request_totals(MultiProcessDirCollector(None, sys.argv[1]).collect())
        print(json.dumps([[s.name, s.labels, s.value] for f in families for s in f.samples]))
        """
    return json.loads(run_python(code, str(directory)))


def test_multiprocess_mode_writes_cells_files_and_totals_derive(tmp_path: Path):
    directory = tmp_path / "mp"
    directory.mkdir()
    for _ in range(2):  # two "workers", one after the other
        run_python(MULTIPROCESS_CHILD, multiproc_dir=directory)
    written = sorted(p.name.split("_")[0] for p in directory.iterdir())
    assert written == ["http", "http"]  # one cells file per process (pid identities here), no *.db
    flat = _aggregate(directory)
    totals = {(s[1]["path"], s[1]["status_code"]): s[2] for s in flat if s[0] == "starlette_requests_total"}
    assert totals == {
        ("/items/{item_id}", "200"): 4,
        ("/v1/api/users/{user_id}", "200"): 2,
        (UNKNOWN_PATH, "404"): 2,
    }
    gauges = {s[1]["method"]: s[2] for s in flat if s[0] == "starlette_requests_in_progress"}
    assert gauges == {"GET": 0.0}


def _http_count(reader: Any) -> float:
    return sum(
        s.value for family in reader.http_metrics() for s in family.samples if s.name == DURATION + "_count"
    )


def test_request_is_counted_before_its_final_body_reaches_the_server(tmp_path: Path):
    """What a client has received is already in the shared cells: checked inside the server's send."""
    middleware = PrometheusMiddleware(make_app(), registry=None, directory=str(tmp_path))
    reader = MultiProcessDirCollector(None, tmp_path)
    counted_at_send: list[float] = []

    async def server_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            counted_at_send.append(_http_count(reader))

    scope = {"type": "http", "method": "GET", "path": "/items/3", "root_path": "", "headers": [],
             "query_string": b""}  # fmt: skip
    for _ in range(3):
        run(middleware(dict(scope), _no_message, server_send))
    assert counted_at_send == [1, 2, 3]


def test_a_resolved_label_set_allocates_nothing_more(tmp_path: Path):
    middleware = PrometheusMiddleware(make_app(), registry=None, directory=str(tmp_path))
    writer = middleware._store.writer
    run(get_all(middleware, "/items/1"))
    used = writer.used
    run(get_all(middleware, *["/items/2"] * 20))
    assert writer.used == used
    assert _http_count(MultiProcessDirCollector(None, tmp_path)) == 21


def test_traceparent_becomes_the_exemplar_of_its_bucket(registry, fake_clock):
    async def timed(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        fake_clock.advance(0.2)
        await send({"type": "http.response.body", "body": b""})

    middleware = PrometheusMiddleware(timed, registry=registry)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"

    async def requests() -> None:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/x", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
            await client.get("/x")  # no trace: the exemplar stays
            await client.get("/x", headers={"traceparent": f"ff-{trace}-00f067aa0ba902b7-01"})  # invalid

    run(requests())
    exemplars = {
        s.labels["le"]: s.exemplar
        for family in registry.collect()
        for s in family.samples
        if s.name == DURATION + "_bucket" and s.exemplar is not None
    }
    assert list(exemplars) == ["0.25"]
    assert exemplars["0.25"].labels == {"trace_id": trace, "span_id": "00f067aa0ba902b7"}
    assert exemplars["0.25"].value == pytest.approx(0.2)


@pytest.mark.parametrize(
    "value",
    [
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
        b"garbage",
    ],
)
def test_invalid_traceparent_is_ignored(value: bytes):
    assert instrumentation._parse_traceparent(value) is None


def test_valid_traceparent_parses():
    parsed = instrumentation._parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert parsed == (0x4BF92F3577B34DA6, 0xA3CE929D0E0E4736, 0x00F067AA0BA902B7)


def test_an_opentelemetry_span_becomes_the_exemplar_once_a_tracer_provider_is_set(tmp_path: Path):
    """opentelemetry-api's public API only (no SDK): a current valid span gives the exemplar once a tracer
    provider is set, even one set after the first requests (rechecked every _OTEL_RECHECK requests);
    before that the span is not looked up (FastAPI imports the API whenever it is installed)."""
    out = run_python(
        """
        import asyncio
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext

        from gunicorn_prometheus import instrumentation
        from gunicorn_prometheus.collector import MultiProcessDirCollector

        instrumentation._OTEL_RECHECK = 3

        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async def receive():
            return {"type": "http.request"}

        async def server_send(message):
            pass

        middleware = instrumentation.PrometheusMiddleware(app, registry=None)
        span = NonRecordingSpan(SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, False))

        def exemplars():
            reader = MultiProcessDirCollector(None)
            return sorted(
                s.exemplar.labels["trace_id"]
                for family in reader.collect()
                for s in family.samples
                if s.exemplar is not None
            )

        def request():
            with trace.use_span(span):
                asyncio.run(middleware({"type": "http", "method": "GET", "path": "/", "root_path": "",
                                        "headers": []}, receive, server_send))

        request()
        print("before", exemplars())
        trace.set_tracer_provider(trace.NoOpTracerProvider())
        request()
        request()
        print("countdown", exemplars())
        request()
        print("after", exemplars())
        """,
        multiproc_dir=tmp_path,
    )
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert out.splitlines() == ["before []", "countdown []", f"after ['{trace_id}']"], out


@pytest.fixture
def table(tmp_path: Path) -> Iterator[shared_state.Table]:
    """A shared table in `tmp_path`, where this process counts its write errors as slot 3."""
    (tmp_path / shared_state.STATE_DIR).mkdir()
    created = shared_state.create(tmp_path)
    shared_state.count_write_errors_as(created, 3)
    yield created
    shared_state.count_write_errors_as(None, None)
    shared_state.forget(tmp_path)


def test_a_worker_without_a_cells_file_counts_its_requests_as_write_errors_then_by_label(
    tmp_path: Path, table: shared_state.Table, monkeypatch: pytest.MonkeyPatch
):
    """The file cannot be created (a full disk): no request is lost from sight, each one is a write error
    of the worker's slot in the shared table; once there is room, requests are counted by label again."""
    clock = {"now": 50.0}
    monkeypatch.setattr(cells, "_monotonic", lambda: clock["now"])

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cells, "_reserve", full)
    middleware = PrometheusMiddleware(make_app(), registry=None, directory=str(tmp_path))
    assert run(get_all(middleware, "/items/1", "/items/2", "/nope", "/items/3")) == [200, 200, 404, 200]
    assert table.worker(3).write_errors == 4
    assert not list(tmp_path.glob("*.cells"))
    monkeypatch.setattr(cells, "_reserve", lambda fd, offset, length: os.posix_fallocate(fd, offset, length))
    run(get_all(middleware, "/items/4"))  # the retry interval has not passed: still a write error
    clock["now"] += cells.RETRY_SECONDS
    run(get_all(middleware, "/items/5", "/items/6", "/nope"))
    assert table.worker(3).write_errors == 5
    assert _http_count(MultiProcessDirCollector(None, tmp_path)) == 3
