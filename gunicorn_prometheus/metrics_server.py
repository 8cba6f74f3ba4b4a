"""The metrics server: `GET /metrics` and `GET /healthz`, on the socket the master bound for it.

Everything is computed here, at scrape time, so workers pay nothing for it: the multiprocess files are
aggregated, `starlette_requests_total` is derived from the duration histogram's counts, workers alive and
desired come from the OS and the master's state file, and per-process CPU/memory from psutil.

Each of the two peer processes (metrics_process) runs this: one event loop for every connection
(metrics_http), scrapes collected in a small pool off the loop (one collection at a time, shared by every
request that arrived while it waited), so a slow scrape never holds up `/healthz`. What only `/metrics`
needs (metrics_scrape) is imported in the pool once the peer serves, not before it answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from . import metrics_process, server_state, settings, shared_state, web_config
from .metrics_http import HttpServer, Request, Response
from .multiproc_dir import state_dir

if TYPE_CHECKING:
    from . import metrics_scrape


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ServerView:
    """What the state directory and the OS say about the server right now."""

    def __init__(self, directory: str, master_pid: int, metrics_listener: int | None = None) -> None:
        self.state = state_dir(directory)
        self.master_pid = master_pid
        #: inode of the metrics port's listening socket, which the master holds too (to start new peers):
        #: not one of the app's listeners whose backlog /metrics reports
        self.metrics_listener = metrics_listener

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


_NOT_FOUND = b"Not found: the metrics server serves /metrics and /healthz\n"


class MetricsApp:
    """The routes: /metrics (credentials if configured), /healthz (open, detail with credentials), 404."""

    def __init__(
        self,
        view: ServerView,
        directory: str,
        access: web_config.Access,
        pool: concurrent.futures.Executor,
    ) -> None:
        self.view = view
        self.directory = directory
        self.access = access
        self.pool = pool
        # bcrypt takes tens of ms: checked in a thread of its own, never on the loop or behind a scrape
        self.auth_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="auth")
        self._scrapes: asyncio.Future[metrics_scrape.Scrapes] | None = None

    async def scrapes(self) -> metrics_scrape.Scrapes:
        """The /metrics machinery, imported and built in the pool at its first use (see metrics_scrape)."""
        if self._scrapes is None:
            self._scrapes = asyncio.get_running_loop().run_in_executor(self.pool, self._load_scrapes)
        try:
            return await asyncio.shield(self._scrapes)
        except Exception:
            self._scrapes = None  # tried again by the next request
            raise

    async def warm_up(self) -> None:
        """Build the /metrics machinery ahead of the first request (see serve); a failure is retried then."""
        with contextlib.suppress(Exception):
            await self.scrapes()

    def _load_scrapes(self) -> metrics_scrape.Scrapes:
        from . import metrics_scrape

        collector = metrics_scrape.ServerCollector(self.directory, self.view)
        return metrics_scrape.Scrapes(collector, metrics_scrape.HealthFile(self.view.state), self.pool)

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
            return await self.healthz(await self.allowed(request) if self.access.required else True)
        if not await self.allowed(request):
            return self._unauthorized()
        if path == "/metrics":
            scrapes = await self.scrapes()
            families = await scrapes.families()
            loop = asyncio.get_running_loop()
            body, headers = await loop.run_in_executor(
                self.pool,
                scrapes.encode,
                families,
                request.header("accept"),
                request.header("accept-encoding"),
            )
            return Response(200, body, headers)
        return Response(404, _NOT_FOUND, [("Content-Type", "text/plain")])

    async def healthz(self, detail: bool) -> Response:
        snap = self.view.snapshot()
        healthy = snap["master_alive"] and snap["workers_serving"] >= 1
        shown = {"status": "ok" if healthy else "unavailable"}
        if detail:
            # the same total as gunicorn_metrics_write_errors_total: the HTTP cells keep their own count
            # (left out if the machinery cannot be built: /healthz answers whatever the directory's state)
            with contextlib.suppress(Exception):
                scrapes = await self.scrapes()
                snap["metrics_write_errors"] += int(scrapes.collector.files.http_write_errors_now())
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
    listener = socket.socket(fileno=handoff.listen_fd)
    view = ServerView(directory, handoff.master_pid, os.fstat(listener.fileno()).st_ino)
    app = MetricsApp(view, directory, access, pool)
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
    # The /metrics machinery is imported lazily (metrics_scrape), but built now, in the pool, not at the
    # first request: what it opens in the directory (the shared table's mapping) must be opened while the
    # directory is there. A peer that first built it after an `rm -rf` of the directory answered 500
    # to every /healthz and /metrics (tests/reliability/test_storage_faults.py).
    warm_up = loop.create_task(app.warm_up())
    await done
    # Stopping already: a later SIGTERM (the master sends one to the group and one to its child) must not
    # land between asyncio closing its self-pipe and removing its handler, which logged "Exception ignored
    # when trying to write to the signal wakeup fd" with a traceback (asyncio closes in that order).
    loop.remove_signal_handler(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    warm_up.cancel()
    server.close()
    pool.shutdown(wait=False, cancel_futures=True)


def main() -> int:
    handoff = metrics_process.Handoff.from_environ()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the master decides
    directory = settings.parse_one(settings.BY_NAME["PROMETHEUS_MULTIPROC_DIR"], os.environ)
    # The table first, from the descriptor the master handed down: what the master counts (worker boots
    # and exits, CPU of exited workers) is served even if the directory is removed from here on, and a
    # peer started after such a removal (a replacement) serves it too.
    adopted = None
    if directory and handoff.table_fd is not None:
        adopted = shared_state.adopt_table(directory, handoff.table_fd)
    if not directory or (adopted is None and not Path(directory).is_dir()):
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
