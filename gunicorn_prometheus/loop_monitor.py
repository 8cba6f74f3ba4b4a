"""Saturation seen from inside a worker: its event loop's lag and its AnyIO thread pool.

Request counters do not show a worker whose loop is stalled by one blocking call, or ``def`` routes
queueing for a thread. A timer on the worker's own loop shows both:

- **lag**: every ``SAMPLE_INTERVAL`` (0.1 s) the timer notes when it was due; when it runs, the delay
  since then is how long every other callback on that loop had to wait too. Observed into a histogram
  labelled by worker slot, and the worst of the last ``MAX_WINDOW`` seconds into a gauge. The timer can
  only report a stall once it is over, so it also publishes when it is due next (in the worker's slot of
  the shared table): the metrics server raises that gauge to the stall so far at scrape time, so a loop
  stuck for a minute shows at the next scrape, not after the minute.
- **thread pool** (only when the app imported ``anyio``, as Starlette and FastAPI do): tokens in use and
  the limit of AnyIO's default thread limiter, where Starlette runs ``def`` routes (40 tokens unless the
  app changes it), and how many tasks wait for a token.

What it costs: the request path is not touched at all. The timer runs ten times a second whatever the
traffic and writes through prometheus_client's public API (``Histogram.observe``, ``Gauge.set``, a few
microseconds each into the worker's memory-mapped files): an idle worker used 0.15 % of a core more with
it than without. Under full load bench/throughput measured 0-2.3 % of requests/s, more than those
microseconds explain (README, "Saturation").
Gauges are written only when their value changed. No thread of its own: an earlier version had one
watch for stalls once a second, and every wake-up of a Python thread takes the GIL from the busy loop
(bench/throughput, 2026-11-27: about 0.7 % of a loaded worker's requests/s in one run, within the noise
in the next).

How it starts on the worker's loop: Uvicorn workers create their event loop only after the
``post_worker_init`` hook returns, and Gunicorn has no hook that runs on the loop. Uvicorn does call one
of its own settings on the loop: ``Config.callback_notify`` (the worker's heartbeat, which uvicorn-worker
sets), awaited from the server's first tick once it serves and then every ``timeout_notify`` seconds.
Wrapped, it starts the timer on its first call, at no cost per request. Other workers with no loop yet get
their app wrapped in :class:`StartOnFirstCall` instead (one pass-through call per request).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram

from . import asgi, names

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

#: Seconds between two samples: short enough that a 200 ms stall always shows (the pending timer is due
#: within 0.1 s of the stall's start, so it runs at least 0.1 s late), long enough to cost nothing.
SAMPLE_INTERVAL = 0.1
#: Seconds the worst-lag gauge looks back: the 15 s scrape interval of deploy/ and k8s/, so a scrape at
#: that interval misses no stall.
MAX_WINDOW = 15
#: Gunicorn's error log, configured in every worker: where a failed sample is reported (once).
log = logging.getLogger("gunicorn.error")
#: Lag buckets, seconds: from "a busy loop" (1 ms) to "stalled long enough to fail health checks".
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Figures:
    """This worker's metric children; created in the worker, never at import (which is in the master)."""

    def __init__(self, process: str, window: int, registry: CollectorRegistry | None) -> None:
        self.lag = Histogram(
            names.EVENT_LOOP_LAG,
            "Delay between when a timer on the worker's event loop was due and when it ran, sampled "
            "every 0.1 s.",
            ["process"],
            buckets=LAG_BUCKETS,
            registry=registry,
        ).labels(process)
        self._process = process
        self._registry = registry
        # "live" gauges: the master removes a worker's live files when it reaps it, so a dead worker's
        # last value does not linger (see slots.clear_slot_live_gauges).
        self.lag_max = self._gauge(
            names.EVENT_LOOP_LAG_MAX, f"Worst event-loop lag of the worker in the last {window} s."
        )
        self.in_use: Gauge | None = None
        self.limit: Gauge | None = None
        self.waiting: Gauge | None = None

    def _gauge(self, name: str, doc: str) -> Gauge:
        gauge = Gauge(name, doc, ["process"], multiprocess_mode="livemax", registry=self._registry)
        return gauge.labels(self._process)

    def add_threadpool(self) -> None:
        """Created only once a limiter was found, so apps without AnyIO get no such series."""
        self.in_use = self._gauge(
            names.THREADPOOL_IN_USE,
            "Tokens of the worker's AnyIO default thread limiter in use (threads running sync routes).",
        )
        self.limit = self._gauge(
            names.THREADPOOL_LIMIT, "Tokens of the worker's AnyIO default thread limiter."
        )
        self.waiting = self._gauge(
            names.THREADPOOL_WAITING,
            "Tasks of the worker waiting for a token of its AnyIO default thread limiter.",
        )


class LoopMonitor:
    """Samples one event loop's lag and thread pool from a timer on that loop."""

    def __init__(
        self,
        process: str,
        *,
        interval: float = SAMPLE_INTERVAL,
        window: int = MAX_WINDOW,
        registry: CollectorRegistry | None = None,
        publish_due: Callable[[float], None] | None = None,
    ) -> None:
        self.process = process
        self.interval = interval
        self.window = window
        #: Told when the pending timer is due, on time.monotonic()'s clock, so another process can tell a
        #: stall in progress (the worker's slot in the shared table, which the master clears on reaping it).
        self.publish_due = publish_due
        self.registry = registry
        self.loop: asyncio.AbstractEventLoop | None = None
        self._figures: _Figures | None = None
        # Worst lag per second of the last MAX_WINDOW seconds (a ring), and the value last written.
        self._worst = [0.0] * window
        self._second = 0
        self._lag_max_written = -1.0
        self._limiter: Any = None
        self._limiter_search: asyncio.Task[None] | None = None
        self._threadpool_written: tuple[float, float, float] | None = None
        self._offset = 0.0
        self._reported_failure = False

    @property
    def started(self) -> bool:
        return self.loop is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm the first sample on ``loop`` (running or not yet); later calls do nothing."""
        if self.loop is not None:
            return
        self.loop = loop
        try:
            self._figures = _Figures(self.process, self.window, self.registry)
        except Exception:  # e.g. a full /dev/shm: no saturation figures, but the worker serves on
            self._report_failure()
            return
        # uvloop's loop.time() is libuv's cached millisecond clock; time.monotonic() reads the same clock
        # precisely. Should a loop use another clock, measure in its own.
        self._offset = time.monotonic() - loop.time()
        if abs(self._offset) > 1.0:
            self._offset = float("nan")
        self._second = int(loop.time())
        self._arm()

    def _now(self) -> float:
        if self._offset != self._offset:  # NaN: the loop's own clock
            assert self.loop is not None
            return self.loop.time()
        return time.monotonic() - self._offset

    def _arm(self) -> None:
        loop = self.loop
        assert loop is not None
        due = loop.time() + self.interval
        loop.call_at(due, self._tick, due)
        # Only on time.monotonic()'s clock (NaN offset: the loop has a clock of its own) is the due time
        # comparable in another process.
        if self.publish_due is not None and self._offset == self._offset:
            try:
                self.publish_due(due + self._offset)
            except Exception:  # a metrics fault costs the stall-in-progress figure, never the loop
                self._report_failure()

    def _tick(self, due: float) -> None:
        try:
            self.sample(max(self._now() - due, 0.0))
        except Exception:  # a metrics fault costs samples, never the loop's other callbacks or a log flood
            self._report_failure()
        self._arm()

    def _report_failure(self) -> None:
        if not self._reported_failure:
            self._reported_failure = True
            log.warning(
                "Saturation sampling failed: its figures are missing or late (reported once)", exc_info=True
            )

    def sample(self, lag: float) -> None:
        """Record one lag sample, and the thread pool's state."""
        figures = self._figures
        assert figures is not None
        figures.lag.observe(lag)
        self._record_worst(lag, figures)
        if self._limiter is not None:
            self._record_threadpool(figures)
        elif self._limiter_search is None and "anyio" in sys.modules:
            self._find_limiter()

    def _record_worst(self, lag: float, figures: _Figures) -> None:
        assert self.loop is not None
        second = int(self.loop.time())
        worst = self._worst
        if second != self._second:
            # Seconds that passed with no sample (a stall) had no worse lag than this one: clear them.
            window = self.window
            for passed in range(self._second + 1, min(second, self._second + window) + 1):
                worst[passed % window] = 0.0
            self._second = second
        index = second % self.window
        if lag > worst[index]:
            worst[index] = lag
        value = max(worst)
        if value != self._lag_max_written:
            figures.lag_max.set(value)
            self._lag_max_written = value

    def _find_limiter(self) -> None:
        """Look the limiter up from a task: AnyIO finds its backend (and the loop's limiter) in one."""
        assert self.loop is not None

        async def find() -> None:
            try:
                from anyio.to_thread import current_default_thread_limiter

                limiter = current_default_thread_limiter()
                limiter.statistics()  # fails now, not at every sample, if the API is not as expected
                assert self._figures is not None
                self._figures.add_threadpool()
            except Exception:  # an AnyIO we do not understand, or files that cannot be created
                self._report_failure()
                return
            self._limiter = limiter

        self._limiter_search = self.loop.create_task(find())

    def _record_threadpool(self, figures: _Figures) -> None:
        limiter = self._limiter
        try:
            state = (
                float(limiter.borrowed_tokens),
                float(limiter.total_tokens),
                float(limiter.statistics().tasks_waiting),
            )
        except Exception:
            return
        if state == self._threadpool_written:
            return
        assert figures.in_use is not None and figures.limit is not None and figures.waiting is not None
        figures.in_use.set(state[0])
        figures.limit.set(state[1])
        figures.waiting.set(state[2])
        self._threadpool_written = state


class StartOnFirstCall:
    """ASGI pass-through that starts the monitor on the loop that makes the first call.

    After that call it turns into a plain function call that returns the app's own coroutine (see
    :class:`_PassThrough`): measured with callgrind, an ``async`` pass-through costs ~2,100 instructions per
    request (0.27 % of a Quick Start request's ~776k), the plain call ~1,300 (0.17 %).
    """

    __slots__ = ("app", "monitor")  # the same layout in both classes, so the switch keeps fast attributes

    def __init__(self, app: ASGIApp, monitor: LoopMonitor) -> None:
        self.app = app
        self.monitor = monitor

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if not self.monitor.started:
            self.monitor.start(asyncio.get_running_loop())
        # Servers tell an ASGI3 app by its ``async def __call__`` once, when they load it (Uvicorn's
        # Config.load), before this first call; afterwards they only await what the call returns.
        self.__class__ = _PassThrough
        await self.app(scope, receive, send)


class _PassThrough(StartOnFirstCall):
    """:class:`StartOnFirstCall` once the monitor runs: no coroutine of its own per request."""

    __slots__ = ()

    def __call__(self, scope: Scope, receive: Any, send: Any) -> Awaitable[None]:  # type: ignore[override]
        return self.app(scope, receive, send)


def install(worker: Any, process: str, publish_due: Callable[[float], None] | None = None) -> LoopMonitor:
    """Monitor this worker's event loop; called from the ``post_worker_init`` hook.

    Gunicorn's native ``asgi`` worker already has its loop (``worker.loop``): the timer is armed on it
    directly. Uvicorn workers create theirs later: their heartbeat callback starts it (see the module
    docstring). Any other worker's app is wrapped in :class:`StartOnFirstCall`.
    """
    monitor = LoopMonitor(process, publish_due=publish_due)
    loop = getattr(worker, "loop", None)
    config: Any = getattr(worker, "config", None)
    if isinstance(loop, asyncio.AbstractEventLoop):
        monitor.start(loop)
    elif callable(getattr(config, "callback_notify", None)):
        config.callback_notify = start_on_first_notify(config.callback_notify, monitor)
    else:
        attribute = "asgi" if hasattr(worker, "asgi") else "wsgi"
        app = getattr(worker, attribute)
        if asgi.is_asgi3(app):  # an ASGI2 app (a class called with the scope) must reach Uvicorn unwrapped
            setattr(worker, attribute, StartOnFirstCall(app, monitor))
    worker.prometheus_loop_monitor = monitor
    return monitor


def start_on_first_notify(
    notify: Callable[[], Awaitable[None]], monitor: LoopMonitor
) -> Callable[[], Awaitable[None]]:
    """Uvicorn's ``callback_notify``, starting ``monitor`` on the loop that awaits it (first call only)."""

    async def notify_and_start() -> None:
        if not monitor.started:
            try:
                monitor.start(asyncio.get_running_loop())
            except Exception:  # a fault costs the figures, never the heartbeat (the worker's life)
                monitor._report_failure()
        await notify()

    return notify_and_start
