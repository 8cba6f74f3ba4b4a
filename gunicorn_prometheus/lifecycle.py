"""Worker lifecycle as the master sees it: boots, exits by cause, and the CPU of exited workers.

Only what cannot be derived later is counted here: the number of workers alive or desired is read at
scrape time by the metrics process. The master writes these counters through prometheus_client's
multiprocess files under the identity "master".
"""

from __future__ import annotations

import resource
import signal
import sys

from prometheus_client import Counter

EXIT_REASONS = ("clean", "max_requests", "timeout", "crash")
EXITED_CPU_METRIC = "gunicorn_worker_exited_cpu_seconds"

_metrics: tuple[Counter, Counter, Counter] | None = None
_children_cpu_seen = 0.0


def _counters() -> tuple[Counter, Counter, Counter]:
    """Created on first use in the master, after the multiprocess identity is installed."""
    global _metrics
    if _metrics is None:
        boots = Counter("gunicorn_worker_boots", "Workers started by the master.")
        exits = Counter(
            "gunicorn_worker_exits",
            "Workers that ended, by cause: clean (asked to stop), "
            "max_requests (recycled), timeout (killed by the master as silent), crash (killed by a "
            "signal such as the OOM killer, or exited with an error).",
            ["reason"],
        )
        for reason in EXIT_REASONS:
            exits.labels(reason)
        exited_cpu = Counter(
            EXITED_CPU_METRIC, "CPU time of the exited holders of each worker slot.", ["process"]
        )
        _metrics = (boots, exits, exited_cpu)
    return _metrics


def init() -> None:
    """Create the series at start-up so dashboards show zeros rather than nothing."""
    global _children_cpu_seen
    _counters()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    _children_cpu_seen = usage.ru_utime + usage.ru_stime


def worker_booted() -> None:
    _counters()[0].inc()


def exit_reason(aborted: bool, reported: str | None) -> str:
    """Why a reaped worker ended: the master's timeout abort, else what the worker said, else a crash.

    A worker that exits on its own terms writes its reason on the way out; after SIGKILL (OOM killer),
    a segfault or an unhandled error it writes nothing.
    """
    if aborted:
        return "timeout"
    return reported if reported in EXIT_REASONS else "crash"


def worker_exited(reason: str, slot_label: str) -> None:
    """Count the exit and the worker's whole CPU time, taken from the master's reaped-children usage.

    Called from child_exit, right after Gunicorn reaped that worker, so the growth of RUSAGE_CHILDREN
    since the previous call is this worker's lifetime CPU (a reaped helper process would be added to the
    next worker; the metrics supervisor is the only other child and exits only with the server).
    """
    global _children_cpu_seen
    _, exits, exited_cpu = _counters()
    exits.labels(reason).inc()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    if total > _children_cpu_seen:
        exited_cpu.labels(slot_label).inc(total - _children_cpu_seen)
    _children_cpu_seen = total


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
