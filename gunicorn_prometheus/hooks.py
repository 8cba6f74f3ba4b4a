"""The master's state, whose bound methods are Gunicorn's server hooks; installed whatever the config file.

One `Master` per server, made by the master before Gunicorn reads its config file. It holds what the
hooks share (the locked multiprocess directory, the worker slots, the metrics supervisor) instead of
module globals, so a test can build one with a temporary directory and fake server/worker objects and
call its hooks directly. `install()` chains each hook with whatever the config file set (a user's own
`post_fork`, say): both run, ours first, and an exception in theirs stays theirs.

Master: on_starting (the effective configuration), when_ready (metrics process), pre_fork (worker slot,
the slot's HTTP cells file held open), child_exit (exit cause, slot release), nworkers_changed, on_exit.
Worker: post_fork (slot identity, the held cells file, death with the master), post_worker_init (the app
wrapped: ASGI2 adapted, HTTP metrics; "serving"), worker_exit (its own exit reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import inspect
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from . import (
    asgi,
    cells,
    early_start,
    lifecycle,
    metrics_process,
    multiproc_dir,
    names,
    server_state,
    shared_state,
    slots,
)
from .settings import ConfigError, Settings

_PR_SET_PDEATHSIG = 1

DEPRECATED_FLUSH_INTERVAL = (
    "gunicorn-prometheus: METRICS_FLUSH_INTERVAL is deprecated and ignored: HTTP metrics are now written "
    "on every request at no measurable cost; remove it"
)

HOOK_NAMES = (
    "on_starting",
    "when_ready",
    "pre_fork",
    "post_fork",
    "post_worker_init",
    "worker_exit",
    "child_exit",
    "nworkers_changed",
    "pre_exec",
    "on_exit",
)


def config_error_exit(err: ConfigError) -> SystemExit:
    """What the master raises for a configuration mistake: the lines on stderr, exit status 2."""
    for line in str(err).splitlines():
        print(f"gunicorn-prometheus: configuration error: {line}", file=sys.stderr, flush=True)
    return SystemExit(2)


def _die_with_master(master_pid: int) -> None:
    """Have the kernel stop this worker when the master dies, even by SIGKILL (Linux; a no-op elsewhere).

    Without it, workers of a SIGKILLed master keep serving on the app port, and a restart fails to bind
    it (issue: workers outlive a SIGKILLed master). The check after prctl covers a master that died
    before it.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != master_pid:
        os._exit(0)


def chain(ours: Callable[..., Any], theirs: Callable[..., Any] | None) -> Callable[..., None]:
    """One hook calling ours, then theirs, whatever either raises; with the arity Gunicorn checks.

    Ours first in post_worker_init too: a middleware the user's hook wraps around ``worker.wsgi`` is then
    outside ours, so ours sees the scope after the router (a middleware that copies the scope, or sets
    ``root_path`` as ``--root-path`` does, would otherwise hide the route), and reads of ``worker.wsgi``'s
    attributes reach the app (asgi.pass_through).
    """

    def both(*args: Any) -> None:
        try:
            ours(*args)
        finally:
            if theirs is not None:
                theirs(*args)

    both.__signature__ = inspect.signature(ours)  # type: ignore[attr-defined]
    both.__name__ = getattr(ours, "__name__", "hook")
    both._gunicorn_prometheus = True  # type: ignore[attr-defined]
    both._theirs = theirs  # type: ignore[attr-defined]
    return both


class Master:
    """What the master knows about its server; every hook is a bound method of it."""

    def __init__(self, settings: Settings, started: early_start.Started | None = None) -> None:
        """`started`: the directory lock and metrics side the master took before importing Gunicorn."""
        self.settings = settings
        self.directory = settings.multiproc_dir
        self.slots = slots.SlotTable()
        self.supervisor = started.metrics if started else None
        self.lock_fd = started.lock_fd if started else None
        self.pid = os.getpid()  # the master's: Gunicorn's daemon mode changes it (see Application.run)
        self.prepared = False
        self.conf_path: str | None = None
        #: slot -> the master's descriptor of the slot's HTTP cells file (see hold_cells), at most one per
        #: slot ever held, kept until the master stops
        self.cells: dict[int, int] = {}
        self._cells_failure_logged = False

    @property
    def state(self) -> Path:
        return multiproc_dir.state_dir(self.directory)

    def prepare(self) -> None:
        """Empty and lock the metrics directory and name the master's files; once per master process.

        Runs before Gunicorn reads any config file, and so before any app import (a preloaded app, or a
        config file that imports one): metrics the app creates must find the directory and use
        slot-style names, and must not be wiped afterwards. A reload (SIGHUP) leaves the directory alone.
        """
        if self.prepared:
            return
        if self.lock_fd is None:
            self.lock_fd = early_start.lock_directory(self.directory)
        self.prepared = True
        slots.install_identity()
        slots.set_identity(slots.MASTER_IDENTITY)
        shared_state.count_write_errors_as(shared_state.open_table(self.directory), None)

    def install(self, cfg: Any) -> None:
        """Put our hooks into Gunicorn's config, each chained with what the config file set there."""
        for name in HOOK_NAMES:
            setting = cfg.settings[name]
            theirs = setting.get()
            default = type(setting).default
            if getattr(theirs, "_gunicorn_prometheus", False):
                theirs = theirs._theirs  # installed twice on one config: chain with theirs, once
            if _same_function(theirs, default):
                theirs = None  # Gunicorn's no-op default
            cfg.set(name, chain(getattr(self, name), theirs))

    # --- master hooks -------------------------------------------------------------------------------

    def on_starting(self, server: Any) -> None:
        try:
            multiproc_dir.check_space(self.directory, server.num_workers)
        except ConfigError as err:
            raise config_error_exit(err) from None
        lifecycle.init()
        _cut_on_stop()  # the series exists (at zero) from the start
        server_state.write_server(self.state, master_pid=os.getpid(), desired_workers=server.num_workers)
        cfg = server.cfg
        # One line with what Gunicorn will really use (after the config file and GUNICORN_CMD_ARGS),
        # whichever config file printed upstream's line before; never starts with "{" so tools that
        # look for upstream's JSON line do not take it for that.
        effective = {
            "config": self.conf_path,
            "bind": list(cfg.bind),
            "workers": cfg.workers,
            "worker_class": cfg.worker_class_str,
            "loglevel": cfg.loglevel,
            "timeout": cfg.timeout,
            "graceful_timeout": cfg.graceful_timeout,
            "keepalive": cfg.keepalive,
            "metrics": f"{self.settings.metrics_host}:{self.settings.metrics_port}",
            "multiproc_dir": self.directory,
        }
        print(f"gunicorn-prometheus: effective configuration {json.dumps(effective)}", flush=True)
        if "METRICS_FLUSH_INTERVAL" in os.environ:  # a removed setting: accepted, ignored, said once
            print(DEPRECATED_FLUSH_INTERVAL, file=sys.stderr, flush=True)

    def when_ready(self, server: Any) -> None:
        self.pid = server.pid
        if self.supervisor is None:  # not started before Gunicorn was imported, or stopped to daemonize
            try:
                self.supervisor = early_start.start_metrics(self.settings)
            except ConfigError as err:
                raise config_error_exit(err) from None
        server.log.info(
            "Metrics server on http://%s:%s/metrics (pid %s)",
            self.settings.metrics_host,
            self.settings.metrics_port,
            self.supervisor.pid,
        )

    def pre_fork(self, server: Any, worker: Any) -> None:
        # A holder Gunicorn no longer tracks can only be one whose fork failed after this hook: free it.
        tracked = set(map(id, server.WORKERS.values()))
        for held in self.slots.held:
            if id(self.slots.holder(held)) not in tracked:
                self.slots.release(held)
        slot = self.slots.acquire(worker)
        worker.prometheus_slot = slot
        self._recreate_directory()
        self.hold_cells(slot)
        # a reused slot starts with no live gauges
        slots.clear_slot_live_gauges(self.directory, slot, self.cells.get(slot))
        lifecycle.worker_booted()

    def _recreate_directory(self) -> None:
        """After an ``rm -rf`` of the directory, create it again before a worker starts, so the worker's
        prometheus_client files (the app's metrics, the loop and thread-pool figures) can be written again:
        their counts before the removal are gone, later ones are not. Never raises (see hold_cells)."""
        with contextlib.suppress(OSError):
            if not os.path.isdir(self.directory):
                os.mkdir(self.directory, 0o700)

    def hold_cells(self, slot: int) -> None:
        """Hold the slot's HTTP cells file open (created if need be) and name it in the shared table.

        The slot's workers inherit the descriptor and write through it (``cells.give``), and the metrics
        server reads it through ``/proc/<master pid>/fd/``, so an ``rm -rf`` of the directory loses
        nothing counted: a replacement worker continues the same file, unlinked or not. A slot keeps its
        file for the master's whole life (held files take precedence over the path). Never raises: when
        the file cannot be had (a full disk), the worker opens it by path itself, as without this.
        """
        if not self.settings.metrics_instrument or slot in self.cells:
            return
        identity = slots.slot_identity(slot)
        buckets = self.settings.metrics_buckets
        try:
            fd = cells.CellsWriter.hold(buckets, self.directory, identity)
            self.cells[slot] = fd
            table = shared_state.open_table(self.directory)
            if table is not None and slot < shared_state.MAX_SLOTS:
                record = shared_state.HeldCellsRecord(fd, os.fstat(fd).st_ino)
                table.write_held_cells(slot, record)
        except Exception as err:  # a metrics fault must not keep a worker from being forked
            if not self._cells_failure_logged:
                self._cells_failure_logged = True
                print(
                    f"[gunicorn-prometheus] the master cannot open the HTTP metrics file of {identity} in "
                    f"{self.directory}: {getattr(err, 'strerror', None) or err!r}; the worker tries by "
                    "itself (logged once)",
                    file=sys.stderr,
                    flush=True,
                )

    def child_exit(self, server: Any, worker: Any) -> None:
        slot = getattr(worker, "prometheus_slot", None)
        reported = None if slot is None else server_state.pop_exit_reason(self.state, slot, worker.pid)
        self._reaped(worker, lifecycle.exit_reason(getattr(worker, "aborted", False), reported))

    def nworkers_changed(self, server: Any, new_value: int, old_value: int | None) -> None:
        if old_value is not None:
            server_state.write_server(self.state, master_pid=os.getpid(), desired_workers=new_value)

    def pre_exec(self, server: Any) -> None:
        """Refuse USR2's re-exec, in the child Gunicorn forks for it, before it execs a new master.

        A new master could take neither the metrics port nor the directory this one holds (both are its
        until it exits), and Gunicorn would re-exec `gunicorn`, not `python -m gunicorn_prometheus serve`:
        it would fail with a confusing error. One clear line instead; this master goes on serving, and
        Gunicorn forgets the child when it exits. Nothing of the master's is cleaned up by this child.
        """
        server.log.warning(
            "USR2 (upgrade by re-executing the master) is not supported by gunicorn-prometheus: this master "
            "goes on serving; restart the server to upgrade it"
        )
        os._exit(1)

    def on_exit(self, server: Any) -> None:
        self.close()
        sys.stdout.flush()

    def stop_metrics(self) -> None:
        """Stop the metrics side now (bounded); a later when_ready starts it again."""
        if self.supervisor is not None:
            metrics_process.stop(self.supervisor)
            self.supervisor = None

    def close(self) -> None:
        """Stop the metrics side and release the directory; what the master does last, however it ends."""
        self.stop_metrics()
        self._close_cells()
        if self.lock_fd is not None:
            multiproc_dir.release(self.directory, self.lock_fd)
            self.lock_fd = None

    def _close_cells(self, keep: int | None = None) -> None:
        held, self.cells = self.cells, {}
        for slot, fd in held.items():
            if slot == keep:
                self.cells[slot] = fd
                continue
            with contextlib.suppress(OSError):
                os.close(fd)

    def _reaped(self, worker: Any, reason: str) -> None:
        """Count the exit, then free the slot: its live gauges and state go before anyone reuses it."""
        slot = getattr(worker, "prometheus_slot", None)
        pid: int = worker.pid
        if slot is None or self.slots.holder(slot) is not worker:
            return  # not ours, or already released
        lifecycle.worker_exited(reason, slot, pid)
        server_state.clear_worker(self.state, slot)
        slots.clear_slot_live_gauges(self.directory, slot, self.cells.get(slot))
        self.slots.release(slot)

    # --- worker hooks (run in the forked worker) ----------------------------------------------------

    def post_fork(self, server: Any, worker: Any) -> None:
        _die_with_master(server.pid)
        metrics_process.release_in_worker(self.supervisor)  # the metrics port is not the worker's to hold
        self.supervisor = None
        slots.set_identity(slots.slot_identity(worker.prometheus_slot))
        # The slot's HTTP cells file, held open by the master: this worker writes through it. The other
        # slots' descriptors are not this worker's business.
        self._close_cells(keep=worker.prometheus_slot)
        if (fd := self.cells.pop(worker.prometheus_slot, None)) is not None:
            cells.give(self.directory, slots.slot_identity(worker.prometheus_slot), fd)
        shared_state.count_write_errors_as(shared_state.open_table(self.directory), worker.prometheus_slot)
        server_state.mark_worker(self.state, worker.prometheus_slot, os.getpid(), serving=False)

    def post_worker_init(self, worker: Any) -> None:
        lifecycle.exit_cleanly_on_stop_signals()
        if _is_uvicorn_worker(worker):
            _hand_uvicorn_plain_sockets(worker)
            # uvicorn-worker runs Gunicorn's handle_exit on SIGQUIT, which only clears `alive` (read by
            # nothing in an Uvicorn worker): a quick shutdown (SIGINT or SIGQUIT to the master, which
            # sends SIGQUIT to the workers) waited the whole GRACEFUL_TIMEOUT and ended in "SIGKILL!
            # Perhaps out of memory?". See uvicorn-worker's _install_sigquit_handler and gunicorn#2604.
            worker.handle_exit = _quick_uvicorn_exit(worker)
            # Uvicorn itself cuts the requests still running just before the master's GRACEFUL_TIMEOUT
            # would SIGKILL the worker: it then exits normally (worker_exit and the last metrics flush
            # run) and says how many it cut instead of dying as "Perhaps out of memory?".
            worker.config.timeout_graceful_shutdown = max(self.settings.graceful_timeout - 1, 0)
        # The app as Uvicorn would load it, where it would (a factory called in the running loop, ASGI2
        # adapted: our wrappers hide the user's object from Uvicorn's own load, see asgi), then one layer
        # in front of it: the HTTP metrics, which also keep the in-flight count for stops (handing
        # websockets and lifespan to InFlight), or InFlight alone without them.
        attribute = "asgi" if hasattr(worker, "asgi") else "wsgi"  # Gunicorn's native asgi worker: .asgi
        holders: list[Any] = []  # the wrappers that call the app directly once it is loaded

        def loaded(app: Any) -> None:
            for holder in holders:
                holder.app = app

        app: Any
        if _is_uvicorn_worker(worker):
            app = asgi.LoadOnFirstCall(getattr(worker, attribute), worker.log.warning, loaded)
        else:
            app = asgi.as_asgi3(getattr(worker, attribute))
        in_flight = asgi.InFlight(app)
        holders.append(in_flight)
        setattr(worker, attribute, in_flight)
        worker.prometheus_in_flight = in_flight
        if self.settings.metrics_instrument:
            from .instrumentation import PrometheusMiddleware

            middleware = PrometheusMiddleware(
                app,
                app_name=self.settings.metrics_app_name,
                buckets=self.settings.metrics_buckets,
                skip_paths=sorted(self.settings.metrics_skip_paths),
                in_flight=in_flight,
            )
            holders.append(middleware)
            setattr(worker, attribute, middleware)
            worker.prometheus_middleware = middleware
        if self.settings.values.get("METRICS_SATURATION", True):
            from . import loop_monitor

            slot = worker.prometheus_slot
            table = shared_state.open_table(self.directory)  # looked up once: published 10 times a second
            publish_due = None
            if table is not None and slot < shared_state.MAX_SLOTS:
                publish_due = functools.partial(table.write_loop_due, slot)
            loop_monitor.install(worker, slots.slot_identity(slot), publish_due)
        server_state.mark_worker(self.state, worker.prometheus_slot, os.getpid(), serving=True)

    def worker_exit(self, server: Any, worker: Any) -> None:
        if os.getpid() == server.pid:
            # Gunicorn calls this in the master, instead of child_exit, for a worker it found already gone
            # when it tried to signal it: the slot must still be released.
            self._reaped(worker, "crash")
            return
        in_flight = getattr(worker, "prometheus_in_flight", None)
        if in_flight is not None and in_flight.cut:
            when = (
                "by a quick shutdown (SIGINT or SIGQUIT)"
                if getattr(worker, "prometheus_quick_stop", False)
                else f"when GRACEFUL_TIMEOUT ({self.settings.graceful_timeout} s) ended"
            )
            server.log.warning(
                "%d request(s) still running were cut %s (worker %s)", in_flight.cut, when, os.getpid()
            )
            _cut_on_stop().inc(in_flight.cut)
        middleware = getattr(worker, "prometheus_middleware", None)
        handled = getattr(middleware, "requests_handled", 0)
        recycled = bool(worker.max_requests) and handled >= worker.max_requests
        server_state.write_exit_reason(
            self.state, worker.prometheus_slot, "max_requests" if recycled else "clean"
        )


_cut_counter: Counter | None = None


def _cut_on_stop() -> Counter:
    """Requests still running when a stop's grace ended; created in the master, written by workers."""
    global _cut_counter
    if _cut_counter is None:
        _cut_counter = Counter(
            names.REQUESTS_CUT_ON_STOP,
            "Requests still running when a worker's stop grace (GRACEFUL_TIMEOUT) ended, cut by the stop.",
        )
    return _cut_counter


def _is_uvicorn_worker(worker: Any) -> bool:
    return any(c.__module__.split(".")[0] in ("uvicorn", "uvicorn_worker") for c in type(worker).__mro__)


QUICK_STOP_GRACE = 0.5  # seconds a quick shutdown (SIGINT/SIGQUIT) leaves running requests


def _quick_uvicorn_exit(worker: Any) -> Callable[[int, Any], None]:
    """Gunicorn's quick shutdown for an Uvicorn worker, through Uvicorn's own stop.

    Uvicorn stops on its SIGINT handler: it closes idle connections, waits for running requests at most
    `timeout_graceful_shutdown` (here QUICK_STOP_GRACE) and cancels the rest, runs the app's lifespan
    shutdown, then re-raises the signal, which the worker turns into a normal exit
    (`lifecycle.exit_cleanly_on_stop_signals`), so worker_exit and the final metrics flush run.

    A Ctrl-C on a terminal reaches the workers too: each hears of one stop twice, its own SIGINT and the
    master's SIGQUIT, in either order. Uvicorn takes a second SIGINT for a second Ctrl-C and forces the
    exit (no lifespan shutdown, whose cancellation it logs as a traceback), so the other copy of the same
    stop is absorbed, whichever comes second.
    """

    def quick_exit(signum: int, frame: Any) -> None:
        worker.prometheus_quick_stop = True
        worker.config.timeout_graceful_shutdown = QUICK_STOP_GRACE
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            sys.exit(0)
        server = getattr(handler, "__self__", None)
        if getattr(server, "should_exit", False):
            # Its own SIGINT came first: Uvicorn may already wait out the longer graceful grace it read
            # then, so what still runs is cut after QUICK_STOP_GRACE here.
            _cut_running_requests_after(server, QUICK_STOP_GRACE)
            return
        signal.signal(signal.SIGINT, _absorb_one_sigint(handler))  # the terminal's copy may still come
        handler(signal.SIGINT, frame)

    return quick_exit


def _absorb_one_sigint(uvicorn_handler: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
    """A SIGINT handler that ignores one SIGINT, then hands SIGINT back to Uvicorn (a real second Ctrl-C
    still forces the exit, as Uvicorn's own "CTRL+C to force quit" says)."""

    def absorb(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, uvicorn_handler)

    return absorb


def _cut_running_requests_after(server: Any, grace: float) -> None:
    """Cancel the request tasks Uvicorn still runs after `grace` seconds, as its own grace timeout does."""

    def cut() -> None:
        for task in list(getattr(getattr(server, "server_state", None), "tasks", ())):
            task.cancel()

    try:
        asyncio.get_running_loop().call_later(grace, cut)
    except RuntimeError:  # not called from the worker's event loop: nothing to schedule on
        pass


def _hand_uvicorn_plain_sockets(worker: Any) -> None:
    """Give Uvicorn the listening sockets themselves, not Gunicorn's logging wrappers around them.

    Uvicorn passes each socket to `loop.create_server(sock=...)`, which takes ownership (and uvloop closes
    it), then closes it again on shutdown; Gunicorn's wrapper logged that second close as "Error while
    closing socket [Errno 9] Bad file descriptor" on every worker stop. A plain socket object knows it
    is closed and ignores the second close. https://github.com/benoitc/gunicorn/issues/3013
    """
    worker.sockets = [getattr(listener, "sock", None) or listener for listener in worker.sockets]


def _same_function(a: Any, b: Any) -> bool:
    return getattr(a, "__func__", a) is getattr(b, "__func__", b)
