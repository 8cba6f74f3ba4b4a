"""The worker's loop monitor on real event loops (asyncio and uvloop), with real AnyIO thread pools."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import anyio
import anyio.to_thread
import pytest
import uvloop
from prometheus_client import CollectorRegistry

from gunicorn_prometheus import asgi, loop_monitor, names
from tests.support.child import run_python

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def value(registry: CollectorRegistry, name: str, process: str = "w0", **labels: str) -> float | None:
    return registry.get_sample_value(name, {"process": process, **labels})


def above(registry: CollectorRegistry, bound: str, process: str = "w0") -> float:
    """Samples of the lag histogram greater than `bound` seconds."""
    count = value(registry, names.EVENT_LOOP_LAG + "_count", process) or 0.0
    return count - (value(registry, names.EVENT_LOOP_LAG + "_bucket", process, le=bound) or 0.0)


def run(loop_name: str, main, monitor: loop_monitor.LoopMonitor) -> None:
    loop = LOOPS[loop_name]()
    try:
        monitor.start(loop)
        loop.run_until_complete(main())
    finally:
        loop.close()


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_blocked_loop_shows_as_lag(loop_name: str) -> None:
    registry = CollectorRegistry()
    monitor = loop_monitor.LoopMonitor("w0", registry=registry)
    late_before: list[float] = []

    async def main() -> None:
        await wait_for(lambda: (value(registry, names.EVENT_LOOP_LAG + "_count") or 0) >= 3)
        # Counted, not assumed to be 0: on a loaded machine (the parallel suite) an idle loop's timer
        # can run late too, when the OS does not schedule the process for a while.
        late_before.append(above(registry, "0.1"))
        # Blocks the loop, as a sync call in an async route does. 0.3 s, so the pending timer (due within
        # 0.1 s) runs at least 0.2 s late: clear of the 0.1 bucket's edge, whatever the two clocks' rounding
        # (uvloop's loop.time() is a cached millisecond clock).
        time.sleep(0.3)
        await asyncio.sleep(0)
        await wait_for(lambda: above(registry, "0.1") > late_before[0], timeout=1.0)

    run(loop_name, main, monitor)
    assert above(registry, "0.1") >= late_before[0] + 1
    assert (value(registry, names.EVENT_LOOP_LAG_MAX) or 0.0) >= 0.1


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_stall_shows_while_it_lasts(loop_name: str) -> None:
    """The timer reports a stall only once it is over; meanwhile the due time it published stays in the
    past, so another process reading it (the metrics server) sees the stall grow as it lasts."""
    import threading

    registry = CollectorRegistry()
    published: list[float] = []
    monitor = loop_monitor.LoopMonitor("w0", registry=registry, publish_due=published.append)
    stall_seen: list[float] = []
    healthy: list[float] = []
    stalled = threading.Event()

    def watch() -> None:  # another thread reading what was published, as a scrape would
        stalled.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stall = time.monotonic() - published[-1]
            if stall >= 0.3:
                stall_seen.append(stall)
                return
            time.sleep(0.01)

    async def main() -> None:
        await wait_for(lambda: (value(registry, names.EVENT_LOOP_LAG + "_count") or 0) >= 2)
        healthy.append(time.monotonic() - published[-1])
        reader = threading.Thread(target=watch)
        reader.start()
        stalled.set()
        time.sleep(0.6)  # the loop is stuck; the stall must be visible before this ends
        stall_seen.append(-1.0)  # the end of the stall, if the reader saw nothing before it
        reader.join()

    run(loop_name, main, monitor)
    assert stall_seen[0] >= 0.3, stall_seen
    assert above(registry, "0.5") >= 1  # then the timer's own sample of the whole stall
    assert healthy and healthy[0] < 0.3, healthy  # no stall seen before there was one
    assert len(published) >= 3 and published == sorted(published)  # one due time per sample


def test_the_worst_lag_leaves_the_gauge_after_its_window() -> None:
    registry = CollectorRegistry()
    monitor = loop_monitor.LoopMonitor("w3", window=1, registry=registry)
    seen: list[float] = []

    async def main() -> None:
        time.sleep(0.15)
        await wait_for(lambda: (value(registry, names.EVENT_LOOP_LAG_MAX, "w3") or 0) >= 0.05, 1.0)
        seen.append(value(registry, names.EVENT_LOOP_LAG_MAX, "w3"))
        await wait_for(lambda: value(registry, names.EVENT_LOOP_LAG_MAX, "w3") < 0.05, 3.0)

    run("asyncio", main, monitor)
    assert seen and seen[0] >= 0.05


@pytest.mark.parametrize("loop_name", LOOPS)
def test_threadpool_tokens_and_waiting_tasks(loop_name: str) -> None:
    registry = CollectorRegistry()
    monitor = loop_monitor.LoopMonitor("w1", registry=registry)
    release = None

    async def main() -> None:
        nonlocal release
        import threading

        release = threading.Event()
        await wait_for(lambda: value(registry, names.THREADPOOL_LIMIT, "w1") == 40)
        async with anyio.create_task_group() as tasks:
            for _ in range(45):
                tasks.start_soon(anyio.to_thread.run_sync, release.wait)
            await wait_for(
                lambda: (
                    value(registry, names.THREADPOOL_IN_USE, "w1") == 40
                    and value(registry, names.THREADPOOL_WAITING, "w1") == 5
                )
            )
            release.set()
        await wait_for(lambda: value(registry, names.THREADPOOL_IN_USE, "w1") == 0)
        anyio.to_thread.current_default_thread_limiter().total_tokens = 7
        await wait_for(lambda: value(registry, names.THREADPOOL_LIMIT, "w1") == 7)

    run(loop_name, main, monitor)
    assert value(registry, names.THREADPOOL_WAITING, "w1") == 0


def test_starts_on_the_first_asgi_call_and_passes_everything_through() -> None:
    registry = CollectorRegistry()
    monitor = loop_monitor.LoopMonitor("w2", registry=registry)
    calls = []

    async def app(scope, receive, send) -> None:
        calls.append((scope, receive, send))

    wrapped = loop_monitor.StartOnFirstCall(app, monitor)
    assert not monitor.started

    async def main() -> None:
        await wrapped({"type": "lifespan"}, "r", "s")
        assert monitor.loop is asyncio.get_running_loop()
        await wrapped({"type": "http"}, "r2", "s2")
        # from the second call on, a plain call returning the app's own coroutine
        assert not asyncio.iscoroutinefunction(type(wrapped).__call__)
        await wait_for(lambda: (value(registry, names.EVENT_LOOP_LAG + "_count", "w2") or 0) >= 1)

    asyncio.run(main())
    assert calls == [({"type": "lifespan"}, "r", "s"), ({"type": "http"}, "r2", "s2")]


def test_a_metrics_fault_costs_the_figures_never_the_request(tmp_path) -> None:
    """The multiprocess directory is gone when the first call starts the monitor (its files cannot be
    created): the call still reaches the app, and the failure is logged once, not per request."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    out = run_python(
        """
        import asyncio, logging, os, shutil, sys

        from gunicorn_prometheus import loop_monitor

        logging.basicConfig(stream=sys.stdout, format="LOG %(message)s")
        served = []

        async def app(scope, receive, send):
            served.append(scope["type"])

        wrapped = loop_monitor.StartOnFirstCall(app, loop_monitor.LoopMonitor("w0"))
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"])

        async def main():
            for _ in range(3):
                await wrapped({"type": "http"}, None, None)
            await asyncio.sleep(0.3)

        asyncio.run(main())
        print("served", len(served))
        """,
        multiproc_dir=directory,
    )
    assert "served 3" in out, out
    assert out.count("LOG Saturation sampling failed") == 1, out


def test_only_asgi3_apps_are_wrapped() -> None:
    """Uvicorn tells ASGI2 from ASGI3 by looking at the app: an ASGI2 app must reach it unwrapped."""

    class Asgi2:
        def __init__(self, scope) -> None:
            self.scope = scope

        async def __call__(self, receive, send) -> None: ...

    class Asgi3:
        async def __call__(self, scope, receive, send) -> None: ...

    async def asgi3(scope, receive, send) -> None: ...

    class Worker:
        def __init__(self, app) -> None:
            self.wsgi = app

    for app, wrapped in ((Asgi2, False), (Asgi3(), True), (asgi3, True)):
        worker = Worker(app)
        loop_monitor.install(worker, "w0")
        assert isinstance(worker.wsgi, loop_monitor.StartOnFirstCall) is wrapped, app
        assert asgi.is_asgi3(worker.wsgi) is wrapped


def test_an_uvicorn_worker_starts_it_from_its_heartbeat_and_keeps_its_app() -> None:
    """Uvicorn awaits Config.callback_notify on its loop from its first tick: the monitor starts there,
    with no wrapper on the request path, and the worker's own heartbeat still runs every time."""
    from uvicorn.config import Config

    beats = []

    async def heartbeat() -> None:
        beats.append(asyncio.get_running_loop())

    async def app(scope, receive, send) -> None: ...

    worker = SimpleNamespace(wsgi=app, config=Config(app=None, callback_notify=heartbeat))
    monitor = loop_monitor.install(worker, "w0")
    assert worker.wsgi is app and not monitor.started

    async def main() -> None:
        await worker.config.callback_notify()
        assert monitor.loop is asyncio.get_running_loop()
        await worker.config.callback_notify()

    asyncio.run(main())
    assert len(beats) == 2 and beats[0] is monitor.loop
