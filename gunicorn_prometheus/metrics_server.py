"""The metrics server: `GET /metrics` and `GET /healthz`, on the socket the master bound for it.

Everything is computed here, at scrape time, so workers pay nothing for it: the multiprocess files are
aggregated, `starlette_requests_total` is derived from the duration histogram's counts, workers alive and
desired come from the OS and the master's state file, and per-process CPU/memory from psutil.
A threading server, so a slow scrape never holds up `/healthz`.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import psutil
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric

from . import listen_backlog, process_stats, server_state
from .collector import MultiProcessDirCollector
from .derived import derive_request_totals
from .lifecycle import EXITED_CPU_METRIC
from .metrics_process import die_with_parent, parse_args
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
        }


class ServerCollector:
    """Every family /metrics serves: the aggregated files, the derived ones, and the OS's figures."""

    def __init__(self, directory: str, master_pid: int) -> None:
        self.files = MultiProcessDirCollector(None, directory)
        self.view = ServerView(directory, master_pid)

    def collect(self) -> Iterator[Metric]:
        families: list[Metric] = []
        exited: list[tuple[str, float]] = []
        for family in self.files.collect():
            if family.name == EXITED_CPU_METRIC:
                exited.extend(
                    (s.labels.get("process", ""), s.value)
                    for s in family.samples
                    if s.name.endswith("_total")
                )
            else:
                families.append(family)
        yield from derive_request_totals(families)

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
        yield from process_stats.families(
            self.view.master_pid,
            process_stats.worker_samples(snap["workers"]),
            process_stats.exited_cpu(exited),
        )
        yield from listen_backlog.families(self.view.master_pid)


def make_app(directory: str, master_pid: int):
    """The WSGI app of the metrics port: prometheus_client's exposition (negotiation, gzip) plus /healthz."""
    registry = CollectorRegistry(auto_describe=False)
    collector = ServerCollector(directory, master_pid)
    registry.register(collector)
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict, start_response) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            snap = collector.view.snapshot()
            healthy = snap["master_alive"] and snap["workers_serving"] >= 1
            body = json.dumps(
                {
                    "status": "ok" if healthy else "unavailable",
                    **{k: v for k, v in snap.items() if k != "workers"},
                }
            ).encode()
            start_response(
                "200 OK" if healthy else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        body = b"Not found: the metrics server serves /metrics and /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: no log lines
        pass


def serve(fd: int, master_pid: int, directory: str) -> None:
    """Serve forever on the inherited listening socket `fd`."""
    listener = socket.socket(fileno=fd)
    server = _Server(listener.getsockname()[:2], _QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    host, port = listener.getsockname()[:2]
    server.server_name, server.server_port = str(host), port
    server.setup_environ()
    server.set_app(make_app(directory, master_pid))
    server.serve_forever(poll_interval=0.5)


def main() -> int:
    args = parse_args(__doc__)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if not Path(args.dir).is_dir():
        print(f"[gunicorn-prometheus] metrics directory {args.dir} is missing", file=sys.stderr)
        return 1
    serve(args.fd, args.master_pid, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
