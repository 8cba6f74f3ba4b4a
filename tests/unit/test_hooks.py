"""The master's state object: hooks chained with any config file's own, tested with fake Gunicorn objects."""

from __future__ import annotations

import asyncio
import os
import shutil
from types import SimpleNamespace

import pytest
from gunicorn.config import Config

from gunicorn_prometheus import asgi, cells, hooks, multiproc_dir, shared_state
from gunicorn_prometheus.settings import Settings


@pytest.fixture
def master(tmp_path):
    settings = Settings.from_environ(
        {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "mp"), "METRICS_SATURATION": "false"}
    )
    (tmp_path / "mp").mkdir()
    multiproc_dir.state_dir(tmp_path / "mp").mkdir()
    return hooks.Master(settings)


def test_install_puts_every_hook_in_and_gunicorn_accepts_their_arity(master):
    cfg = Config()
    master.install(cfg)
    for name in hooks.HOOK_NAMES:
        hook = cfg.settings[name].get()
        assert getattr(hook, "_gunicorn_prometheus", False), name


def test_user_hooks_and_ours_both_run_and_a_failure_in_theirs_stays_theirs(master, monkeypatch):
    calls = []
    monkeypatch.setattr(master, "nworkers_changed", lambda s, new, old: calls.append(("ours", new)))

    def theirs(server, new_value, old_value):
        calls.append(("theirs", new_value))
        raise RuntimeError("their bug")

    cfg = Config()
    cfg.set("nworkers_changed", theirs)
    master.install(cfg)
    master.install(cfg)  # installing twice (a reload) must not chain ours with ours
    with pytest.raises(RuntimeError, match="their bug"):
        cfg.nworkers_changed(object(), 3, 2)
    assert calls == [("ours", 3), ("theirs", 3)]


def test_ours_failing_still_runs_theirs():
    calls = []

    def ours(server):
        calls.append("ours")
        raise ValueError("ours")

    both = hooks.chain(ours, lambda server: calls.append("theirs"))
    with pytest.raises(ValueError):
        both(object())
    assert calls == ["ours", "theirs"]


class ASGI2App:
    def __init__(self, scope):
        self.scope = scope

    async def __call__(self, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def call(app, scope):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_worker_init_adapts_an_asgi2_app_and_instruments_it(master):
    worker = SimpleNamespace(wsgi=ASGI2App, prometheus_slot=0, max_requests=0)
    master.post_worker_init(worker)
    # one layer: the middleware, which keeps the in-flight count for HTTP requests itself
    assert worker.wsgi is worker.prometheus_middleware
    assert worker.prometheus_in_flight.app is worker.prometheus_middleware.app
    scope = {"type": "http", "method": "GET", "path": "/", "root_path": "", "headers": [], "app": None}
    sent = call(worker.wsgi, scope)
    assert sent[0]["status"] == 204
    assert worker.prometheus_middleware.requests_handled == 1
    assert worker.prometheus_in_flight.cut == 0


def test_worker_init_without_instrumentation_still_adapts_asgi2(tmp_path):
    settings = Settings.from_environ(
        {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "METRICS_INSTRUMENT": "false", "METRICS_SATURATION": "0"}
    )
    multiproc_dir.state_dir(tmp_path).mkdir()
    worker = SimpleNamespace(wsgi=ASGI2App, prometheus_slot=0)
    hooks.Master(settings).post_worker_init(worker)
    assert not hasattr(worker, "prometheus_middleware")
    assert call(worker.wsgi, {"type": "http", "path": "/"})[0]["status"] == 204


def test_a_cancelled_request_is_counted_as_cut():
    async def endless(scope, receive, send):
        await asyncio.sleep(3600)

    in_flight = asgi.InFlight(endless)

    async def run():
        task = asyncio.ensure_future(in_flight({"type": "http"}, None, None))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert in_flight.cut == 1


def test_cancelled_requests_through_the_worker_stack_are_counted_as_cut(master):
    """HTTP requests are counted by the middleware itself, websockets by InFlight behind it: both cut."""
    started = []

    async def endless(scope, receive, send):
        started.append(scope["type"])
        await asyncio.sleep(3600)

    worker = SimpleNamespace(wsgi=endless, prometheus_slot=0, max_requests=0)
    master.post_worker_init(worker)
    in_flight = worker.prometheus_in_flight
    http = {"type": "http", "method": "GET", "path": "/", "root_path": "", "headers": []}

    async def run():
        tasks = [
            asyncio.ensure_future(worker.wsgi(scope, None, None))
            for scope in (http, dict(http), {"type": "websocket", "path": "/ws"})
        ]
        while len(started) < 3:
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results == [None, None, None]  # swallowed where counted, as InFlight does

    asyncio.run(run())
    assert in_flight.cut == 3
    assert worker.prometheus_middleware.requests_handled == 2


def test_pre_fork_holds_each_slots_cells_file_and_never_fails_a_fork_for_it(master, tmp_path, capsys):
    directory = tmp_path / "mp"
    shared_state.forget(directory)
    table = shared_state.create(directory)
    server = SimpleNamespace(WORKERS={})

    def fork() -> SimpleNamespace:
        worker = SimpleNamespace(pid=len(server.WORKERS) + 100)
        master.pre_fork(server, worker)
        server.WORKERS[worker.pid] = worker
        return worker

    try:
        first = fork()
        held = master.cells[first.prometheus_slot]
        path = directory / cells.file_name("w0")
        assert table.held_cells(0) == shared_state.HeldCellsRecord(held, os.stat(path).st_ino & 0xFFFFFFFF)
        shutil.rmtree(directory)
        master.slots.release(first.prometheus_slot)  # reaped; its replacement gets the slot and the file
        del server.WORKERS[first.pid]
        # the replacement keeps the held file, and the directory is there again for its other files
        assert fork().prometheus_slot == 0 and master.cells[0] == held and directory.is_dir()
        assert not (directory / cells.file_name("w0")).exists()
        assert fork().prometheus_slot == 1 and (directory / cells.file_name("w1")).exists()
        shutil.rmtree(directory)
        directory.write_text("not a directory")
        assert fork().prometheus_slot == 2 and 2 not in master.cells
        assert "cannot open the HTTP metrics file of w2" in capsys.readouterr().err
        fork()
        assert "cannot open the HTTP metrics file" not in capsys.readouterr().err  # logged once
        master.close()
        assert master.cells == {}
        with pytest.raises(OSError):
            os.fstat(held)
    finally:
        shared_state.forget(directory)


def test_the_wrappers_pass_attribute_reads_to_the_app_and_stay_copyable():
    """worker.wsgi.state reaches the app through every wrapper; a wrapper without its attributes yet
    (as copy and pickle build one) raises AttributeError instead of recursing."""
    import copy

    from starlette.applications import Starlette

    from gunicorn_prometheus import asgi
    from gunicorn_prometheus.instrumentation import PrometheusMiddleware

    app = Starlette()
    app.state.marker = "set by the app"
    lazy = asgi.LoadOnFirstCall(app, print, lambda loaded: None)
    middleware = PrometheusMiddleware(lazy, registry=None, directory=None, in_flight=asgi.InFlight(lazy))
    assert middleware.state.marker == lazy.state.marker == asgi.InFlight(app).state.marker == "set by the app"
    for wrapper in (lazy, middleware, asgi.InFlight(app)):
        bare = object.__new__(type(wrapper))
        with pytest.raises(AttributeError):
            bare.app  # noqa: B018
        copy.copy(wrapper)
