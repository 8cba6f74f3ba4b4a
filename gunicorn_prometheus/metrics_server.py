"""The metrics server: `GET /metrics` and `GET /healthz`, on the socket the master bound for it.

Everything is computed here, at scrape time, so workers pay nothing for it: the multiprocess files are
aggregated, `starlette_requests_total` is derived from the duration histogram's counts, workers alive and
desired come from the OS and the master's state file, and per-process CPU/memory from psutil.

Each of the two peer processes (metrics_process) runs this: one event loop for every connection
(metrics_http), scrapes collected in a small pool off the loop (one collection at a time, shared by every
request that arrived while it waited), so a slow scrape never holds up `/healthz`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted

from . import (
    lifecycle,
    listen_backlog,
    metrics_process,
    process_stats,
    server_state,
    settings,
    shared_state,
    web_config,
)
from .collector import MultiProcessDirCollector, add_write_errors
from .derived import derive_request_totals
from .metrics_health import HealthFile
from .metrics_http import HttpServer, Request, Response
from .multiproc_dir import state_dir


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ServerView:
    """What the state directory and the OS say about the server right now."""

    def __init__(self, directory: str, master_pid: int) -> None:
        self.state = state_dir(directory)
        self.master_pid = master_pid

    def snapshot(self) -> dict:
        server = server_state.read_server(self.state) or {}
        workers = {
            slot: info
            for slot, info in server_state.workers(self.state).items()
            if isinstance(info.get("pid"), int) and _alive(info["pid"])
        }
        return {
            "master_alive": _alive(self.master_pid),
            "workers_desired": int(server.get("desired_workers", 0)),
            "workers_alive": len(workers),
            "workers_serving": sum(1 for info in workers.values() if info.get("serving")),
            "workers": workers,
            "metrics_write_errors": server_state.write_errors_total(self.state),
        }


class ServerCollector:
    """Every family /metrics serves: the aggregated files, the derived ones, and the OS's figures."""

    def __init__(self, directory: str, master_pid: int) -> None:
        self.files = MultiProcessDirCollector(None, directory)
        self.view = ServerView(directory, master_pid)
        self.files_read = 0  # by the last collect()
        self.cpu = process_stats.CpuLedger(shared_state.open_table(directory))

    def collect(self) -> Iterator[Metric]:
        families = list(self.files.collect())  # the app's files and the HTTP cells
        self.files_read = self.files.files_read + self.files.cell_files_read
        yield from derive_request_totals(families)
        yield from lifecycle.families(server_state.server_record(self.view.state))

        snap = self.view.snapshot()
        for name, doc, value in (
            (
                "gunicorn_workers_desired",
                "Workers the master is configured to keep running.",
                snap["workers_desired"],
            ),
            (
                "gunicorn_workers_alive",
                "Worker processes alive now (booting or serving).",
                snap["workers_alive"],
            ),
            (
                "gunicorn_workers_serving",
                "Workers that loaded the app and serve requests.",
                snap["workers_serving"],
            ),
            (
                "gunicorn_master_up",
                "1 while the Gunicorn master process is alive.",
                int(snap["master_alive"]),
            ),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        stats = process_stats.families(self.view.master_pid, snap["workers"], self.cpu)
        yield from add_write_errors(stats, self.files.http_write_errors)  # the HTTP cells' own count too
        yield from listen_backlog.families(self.view.master_pid)


_NOT_FOUND = b"Not found: the metrics server serves /metrics and /healthz\n"


class _Snapshot:
    """Families already collected, in the shape prometheus_client's encoders read (a `collect()`)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families

    def describe(self) -> list[Metric]:
        return []  # registering must not collect


class Scrapes:
    """Collections run in a small pool, one at a time; requests that arrive meanwhile share the next one.

    So fifty simultaneous scrapes cost two collections, not fifty, each still fresher than its request.
    """

    def __init__(self, collector: ServerCollector, health: HealthFile, pool: concurrent.futures.Executor):
        self.collector = collector
        self.health = health
        self.pool = pool
        self.running: asyncio.Future | None = None
        self.next: asyncio.Future | None = None

    def _collect(self) -> list[Metric]:
        started = time.perf_counter()
        errors_before = self.collector.files.read_errors
        families = list(self.collector.collect())
        served = self.health.record(
            duration=time.perf_counter() - started,
            files=self.collector.files_read,
            series=sum(len(f.samples) for f in families),
            new_read_errors=self.collector.files.read_errors - errors_before,
        )
        families.extend(served.families())
        return families

    async def families(self) -> list[Metric]:
        loop = asyncio.get_running_loop()
        if self.running is None:
            self.running = loop.run_in_executor(self.pool, self._collect)
            self.running.add_done_callback(self._finished)
            return await asyncio.shield(self.running)
        if self.next is None:
            self.next = loop.create_future()
        return await asyncio.shield(self.next)

    def _finished(self, _: asyncio.Future) -> None:
        self.running = None
        waiting, self.next = self.next, None
        if waiting is None:
            return
        loop = asyncio.get_running_loop()
        self.running = loop.run_in_executor(self.pool, self._collect)
        self.running.add_done_callback(self._finished)

        def settle(done: asyncio.Future) -> None:
            if waiting.done():
                return
            if done.exception() is not None:
                waiting.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                waiting.set_result(done.result())

        self.running.add_done_callback(settle)


def _encode(families: list[Metric], accept: str, accept_encoding: str) -> tuple[bytes, list[tuple[str, str]]]:
    """prometheus_client's own negotiation (text or OpenMetrics) and gzip, as its WSGI app does."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry)
    headers = [("Content-Type", content_type)]
    if gzip_accepted(accept_encoding):
        body = gzip.compress(body, compresslevel=6)
        headers.append(("Content-Encoding", "gzip"))
    return body, headers


class MetricsApp:
    """The routes: /metrics (credentials if configured), /healthz (open, detail with credentials), 404."""

    def __init__(
        self,
        collector: ServerCollector,
        scrapes: Scrapes,
        access: web_config.Access,
        pool: concurrent.futures.Executor,
    ) -> None:
        self.collector = collector
        self.scrapes = scrapes
        self.access = access
        self.pool = pool
        # bcrypt takes tens of ms: checked in a thread of its own, never on the loop or behind a scrape
        self.auth_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="auth")

    async def allowed(self, request: Request) -> bool:
        if not self.access.required:
            return True
        authorization = request.header("authorization")
        if not authorization:
            return False
        if self.access.known_good(authorization):
            return True
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.auth_pool, self.access.check, authorization)

    def _unauthorized(self) -> Response:
        return Response(401, b"Unauthorized\n", [("WWW-Authenticate", self.access.challenge)])

    async def __call__(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"Method not allowed\n", [("Allow", "GET, HEAD")])
        path = request.path
        if path == "/healthz":
            return self.healthz(await self.allowed(request) if self.access.required else True)
        if not await self.allowed(request):
            return self._unauthorized()
        if path == "/metrics":
            families = await self.scrapes.families()
            loop = asyncio.get_running_loop()
            body, headers = await loop.run_in_executor(
                self.pool, _encode, families, request.header("accept"), request.header("accept-encoding")
            )
            return Response(200, body, headers)
        return Response(404, _NOT_FOUND, [("Content-Type", "text/plain")])

    def healthz(self, detail: bool) -> Response:
        snap = self.collector.view.snapshot()
        healthy = snap["master_alive"] and snap["workers_serving"] >= 1
        shown = {"status": "ok" if healthy else "unavailable"}
        if detail:
            # the same total as gunicorn_metrics_write_errors_total: the HTTP cells keep their own count
            snap["metrics_write_errors"] += int(self.collector.files.http_write_errors_now())
            shown.update({k: v for k, v in snap.items() if k != "workers"})
        return Response(
            200 if healthy else 503, json.dumps(shown).encode(), [("Content-Type", "application/json")]
        )


def _access_settings() -> tuple[web_config.WebConfig | None, web_config.Access]:
    """The two settings, read from the environment the master handed down (validated at start-up)."""
    config_path = settings.parse_one(settings.BY_NAME["METRICS_WEB_CONFIG"], os.environ)
    token_file = settings.parse_one(settings.BY_NAME["METRICS_BEARER_TOKEN_FILE"], os.environ)
    config = web_config.load(config_path) if config_path else None
    return config, web_config.Access(config, token_file)


async def serve(handoff: metrics_process.Handoff, directory: str, peer_child: int | None = None) -> None:
    """Serve on the inherited socket until SIGTERM or the master is gone; keep the other peer alive."""
    loop = asyncio.get_running_loop()
    config, access = _access_settings()
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="scrape")
    collector = ServerCollector(directory, handoff.master_pid)
    scrapes = Scrapes(collector, HealthFile(state_dir(directory)), pool)
    app = MetricsApp(collector, scrapes, access, pool)
    listener = socket.socket(fileno=handoff.listen_fd)
    server = HttpServer(
        listener,
        app,
        ssl_context=config.ssl_context() if config else None,
        extra_headers=config.headers if config else None,
    )
    done = loop.create_future()

    def finish() -> None:
        keeper.stop()
        if not done.done():
            done.set_result(None)

    keeper = metrics_process.PeerKeeper(
        loop, handoff, directory, on_master_gone=finish, peer_child=peer_child
    )
    loop.add_signal_handler(signal.SIGTERM, finish)
    server.start()
    keeper.start()
    await done
    server.close()
    pool.shutdown(wait=False, cancel_futures=True)


def main() -> int:
    handoff = metrics_process.Handoff.from_environ()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the master decides
    directory = settings.parse_one(settings.BY_NAME["PROMETHEUS_MULTIPROC_DIR"], os.environ)
    if not directory or not Path(directory).is_dir():
        metrics_process.log(f"metrics directory {directory} is missing")
        return 1
    peer_child = None
    if handoff.peer_pidfd is None:  # the first peer, spawned by the master
        os.setpgid(0, 0)  # it leads the group every later peer joins (see metrics_process.stop)
        with contextlib.suppress(OSError):  # else PeerKeeper spawns a fresh partner
            handoff, peer_child = metrics_process.fork_second_peer(handoff)
    try:
        asyncio.run(serve(handoff, directory, peer_child))
    except (settings.ConfigError, web_config.WebConfigError) as err:
        metrics_process.log(f"metrics server cannot start: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
