"""What only `GET /metrics` needs: the collection of every family, and its encoding.

Imported by each metrics peer in its scrape pool once it serves, not before it answers: prometheus_client
and our collectors are most of a peer's imports, and a peer starts while the workers boot, on the same
cores (issue 12: start-up time). `/healthz` answers without it; with detail, it adds the HTTP cells'
write errors read through it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted

from . import lifecycle, listen_backlog, process_stats, server_state, shared_state
from .collector import MultiProcessDirCollector, add_write_errors
from .derived import derive_request_totals, with_stalls_in_progress
from .metrics_health import HealthFile
from .metrics_server import ServerView


class ServerCollector:
    """Every family /metrics serves: the aggregated files, the derived ones, and the OS's figures."""

    def __init__(self, directory: str, view: ServerView) -> None:
        # Built in a peer's first seconds, which an `rm -rf` of the directory can precede: that must not
        # make every /metrics a 500 (CI, test_directory_removed_under_load, 1 of 3 fresh-clone runs on
        # 2026-11-27).
        self.files = MultiProcessDirCollector(None, directory, missing_ok=True)
        self.view = view  # the peer's own, shared with /healthz
        self.files_read = 0  # by the last collect()
        self.cpu = process_stats.CpuLedger(shared_state.open_table(directory))

    def collect(self) -> Iterator[Metric]:
        families = list(self.files.collect())  # the app's files and the HTTP cells
        self.files_read = self.files.files_read + self.files.cell_files_read
        snap = self.view.snapshot()
        families = with_stalls_in_progress(families, snap["workers"], time.monotonic())
        yield from derive_request_totals(families)
        yield from lifecycle.families(server_state.server_record(self.view.state))

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
        yield from listen_backlog.families(self.view.master_pid, exclude=self.view.metrics_listener)


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

    @staticmethod
    def encode(
        families: list[Metric], accept: str, accept_encoding: str
    ) -> tuple[bytes, list[tuple[str, str]]]:
        """prometheus_client's own negotiation (text or OpenMetrics) and gzip, as its WSGI app does."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(families))
        encoder, content_type = _negotiate(accept)
        body = encoder(registry)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(accept_encoding):
            body = gzip.compress(body, compresslevel=6)
            headers.append(("Content-Encoding", "gzip"))
        return body, headers


def _negotiate(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """prometheus_client's choice of format for an `Accept` header, or the plain text format when it cannot
    choose: it compares the `version=` parameter as a tuple of ints and strs, and raised TypeError on
    `text/plain; version=foo`, a 500 and a traceback for any client that sent it."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        return choose_encoder("")
