"""Worker lifecycle as the master sees it: boots, exits by cause, and the CPU of exited workers.

Only what cannot be derived later is counted here: the number of workers alive or desired is read at
scrape time by the metrics process. The master keeps these counts in the shared state table
(:mod:`gunicorn_prometheus.shared_state`), which is allocated at start-up, so counting never writes a
metric file and cannot fail on a full disk; the metrics server turns them into families.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace

from prometheus_client.core import CounterMetricFamily, Metric

from . import names
from .shared_state import EXIT_REASONS, MAX_SLOTS, ReapedRecord, ServerRecord, Table, open_table

__all__ = ["EXIT_REASONS", "exit_reason", "families", "init", "worker_booted", "worker_exited"]

_children_cpu_seen = 0.0


def _table() -> Table | None:
    """The master's mapping of the table (created by multiproc_dir.prepare before any hook runs)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return open_table(directory) if directory else None


def _update(change: Callable[[ServerRecord], ServerRecord]) -> None:
    if (table := _table()) is not None:
        table.write_server(change(table.server()))


def init() -> None:
    """Note the CPU of children reaped before any worker (none, normally): it is no worker's."""
    global _children_cpu_seen
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    _children_cpu_seen = usage.ru_utime + usage.ru_stime


def worker_booted() -> None:
    _update(lambda r: replace(r, boots=r.boots + 1))


def exit_reason(aborted: bool, reported: str | None) -> str:
    """Why a reaped worker ended: the master's timeout abort, else what the worker said, else a crash.

    A worker that exits on its own terms writes its reason on the way out; after SIGKILL (OOM killer),
    a segfault or an unhandled error it writes nothing.
    """
    if aborted:
        return "timeout"
    return reported if reported in EXIT_REASONS else "crash"


def worker_exited(reason: str, slot: int, pid: int) -> None:
    """Count the exit, and add the worker's whole CPU time (the master's reaped-children usage) to its slot.

    Called from child_exit, right after Gunicorn reaped that worker, so the growth of RUSAGE_CHILDREN
    since the previous call is this worker's lifetime CPU (a reaped helper process would be added to the
    next worker; the metrics supervisor is the only other child and exits only with the server).
    """
    global _children_cpu_seen
    index = EXIT_REASONS.index(reason)

    def count(r: ServerRecord) -> ServerRecord:
        exits = tuple(n + (1 if i == index else 0) for i, n in enumerate(r.exits))
        return replace(r, exits=exits)  # type: ignore[arg-type]

    _update(count)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    spent, _children_cpu_seen = max(total - _children_cpu_seen, 0.0), max(total, _children_cpu_seen)
    if (table := _table()) is not None and 0 <= slot < MAX_SLOTS:
        # CPU and pid in one record: the metrics server knows from it that this holder's CPU is included.
        before = table.reaped(slot)
        table.write_reaped(slot, ReapedRecord(pid, before.cpu_seconds + spent, before.reaps + 1))


def families(record: ServerRecord | None) -> Iterator[Metric]:
    """`gunicorn_worker_boots_total` and `gunicorn_worker_exits_total{reason}`, for the metrics server."""
    record = record or ServerRecord()
    boots = CounterMetricFamily(names.WORKER_BOOTS, "Workers started by the master.")
    boots.add_metric([], record.boots)
    exits = CounterMetricFamily(
        names.WORKER_EXITS,
        "Workers that ended, by cause: clean (asked to stop), "
        "max_requests (recycled), timeout (killed by the master as silent), crash (killed by a "
        "signal such as the OOM killer, or exited with an error).",
        labels=["reason"],
    )
    for reason, count in record.exits_by_reason().items():
        exits.add_metric([reason], count)
    yield from (boots, exits)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def _exit_cleanly(signum: int, frame: object) -> None:
    sys.exit(0)


def exit_cleanly_on_stop_signals() -> None:
    """Turn a stop signal that would kill the worker outright into a normal exit (in the worker).

    Uvicorn handles SIGTERM/SIGINT/SIGQUIT while it serves, finishes in-flight requests, then raises the
    same signal again once its own handlers are gone. Uvicorn workers leave these signals at their
    default action, so that last signal killed the process on the spot: Gunicorn's worker_exit hook and
    atexit never ran (a stop looked like a crash, and the last batched HTTP metrics were lost). A
    handler that exits with status 0 lets both run. Only signals still at their default action are
    changed, so workers that handle them in Python (Gunicorn's own `asgi` worker) keep their behaviour.
    """
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _exit_cleanly)
