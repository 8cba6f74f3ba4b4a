"""Gunicorn server hooks: thin calls into the modules that do the work.

Master: on_starting (fresh multiprocess directory, identity, start-up JSON), when_ready (metrics process),
pre_fork (worker slot), child_exit (exit cause, slot release), nworkers_changed, on_exit.
Worker: post_fork (slot identity), post_worker_init (instrumentation, "serving"), worker_exit (own reason).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from . import launch, lifecycle, metrics_process, multiproc_dir, server_state, shared_state, slots
from .settings import ConfigError

_slots = slots.SlotTable()
_supervisor = None
_lock_fd: int | None = None
_startup_info: dict[str, Any] = {}


def configure(startup_info: dict[str, Any]) -> None:
    """Called by the config module with the values it derived, for the start-up JSON line."""
    _startup_info.clear()
    _startup_info.update(startup_info)


def _directory() -> str:
    return os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _state() -> Path:
    return multiproc_dir.state_dir(_directory())


def _exit_config_error(err: ConfigError) -> None:
    raise SystemExit(f"gunicorn-prometheus: configuration error: {err}")


def _bind_text(cfg: Any) -> str:
    return ",".join(cfg.bind) if len(cfg.bind) > 1 else cfg.bind[0]


def prepare_master() -> None:
    """Empty and lock the metrics directory and name the master's files; once per master process.

    Called while Gunicorn reads its config, which is before `preload_app` imports the app in the master:
    metrics created by a preloaded app must already use slot-style names and must not be wiped afterwards.
    A config reload (SIGHUP) reads the config again; the directory is then left alone.
    """
    global _lock_fd
    if _lock_fd is not None:
        return
    try:
        _lock_fd = multiproc_dir.prepare(_directory())
    except ConfigError as err:
        _exit_config_error(err)
    slots.install_identity()
    slots.set_identity(slots.MASTER_IDENTITY)
    shared_state.count_write_errors_as(shared_state.open_table(_directory()), None)


def on_starting(server: Any) -> None:
    prepare_master()
    try:
        multiproc_dir.check_space(_directory(), server.num_workers)
    except ConfigError as err:
        _exit_config_error(err)
    lifecycle.init()
    server_state.write_server(_state(), master_pid=os.getpid(), desired_workers=server.num_workers)
    cfg = server.cfg
    # Upstream's keys, read back from Gunicorn's effective config (so GUNICORN_CMD_ARGS shows), then ours.
    info = {
        "loglevel": cfg.loglevel,
        "workers": cfg.workers,
        "bind": _bind_text(cfg),
        "graceful_timeout": cfg.graceful_timeout,
        "timeout": cfg.timeout,
        "keepalive": cfg.keepalive,
        "errorlog": cfg.errorlog,
        "accesslog": cfg.accesslog,
        **_startup_info,
        "worker_class": cfg.worker_class_str,
        "multiproc_dir": _directory(),
    }
    print(json.dumps(info), flush=True)


def when_ready(server: Any) -> None:
    global _supervisor
    host, port = _startup_info["metrics_host"], _startup_info["metrics_port"]
    try:
        sock = metrics_process.bind_metrics_socket(host, port)
    except OSError as err:
        _exit_config_error(launch.bind_error("METRICS_PORT", host, port, err))
    try:
        _supervisor = metrics_process.start(sock, master_pid=os.getpid(), directory=_directory())
    finally:
        sock.close()  # before any worker forks: only the supervisor keeps the metrics socket
    server.log.info("Metrics server on http://%s:%s/metrics (supervisor pid %s)", host, port, _supervisor.pid)


def pre_fork(server: Any, worker: Any) -> None:
    # A holder Gunicorn no longer tracks can only be one whose fork failed after this hook: free it.
    tracked = set(map(id, server.WORKERS.values()))
    for held in _slots.held:
        if id(_slots.holder(held)) not in tracked:
            _slots.release(held)
    slot = _slots.acquire(worker)
    worker.prometheus_slot = slot
    slots.clear_slot_live_gauges(_directory(), slot)  # a reused slot starts with no live gauges
    lifecycle.worker_booted()


def post_fork(server: Any, worker: Any) -> None:
    slots.set_identity(slots.slot_identity(worker.prometheus_slot))
    shared_state.count_write_errors_as(shared_state.open_table(_directory()), worker.prometheus_slot)
    server_state.mark_worker(_state(), worker.prometheus_slot, os.getpid(), serving=False)


def post_worker_init(worker: Any) -> None:
    lifecycle.exit_cleanly_on_stop_signals()
    if _startup_info.get("instrument", True):
        from .instrumentation import PrometheusMiddleware

        attribute = "asgi" if hasattr(worker, "asgi") else "wsgi"  # Gunicorn's native asgi worker: .asgi
        middleware = PrometheusMiddleware(
            getattr(worker, attribute),
            app_name=_startup_info["app_name"],
            buckets=_startup_info["buckets"],
            skip_paths=_startup_info["skip_paths"],
            flush_interval=_startup_info["flush_interval"],
        )
        setattr(worker, attribute, middleware)
        worker.prometheus_middleware = middleware
    if _startup_info.get("saturation", True):
        from . import loop_monitor

        loop_monitor.install(worker, slots.slot_identity(worker.prometheus_slot))
    server_state.mark_worker(_state(), worker.prometheus_slot, os.getpid(), serving=True)


def worker_exit(server: Any, worker: Any) -> None:
    if os.getpid() == server.pid:
        # Gunicorn calls this in the master, instead of child_exit, for a worker it found already gone
        # when it tried to signal it: the slot must still be released.
        _reaped(worker, "crash")
        return
    middleware = getattr(worker, "prometheus_middleware", None)
    if middleware is not None:
        middleware.flush()  # observations still batched in memory reach the files before the process ends
    handled = getattr(middleware, "requests_handled", 0)
    recycled = bool(worker.max_requests) and handled >= worker.max_requests
    server_state.write_exit_reason(_state(), worker.prometheus_slot, "max_requests" if recycled else "clean")


def child_exit(server: Any, worker: Any) -> None:
    slot = getattr(worker, "prometheus_slot", None)
    reported = None if slot is None else server_state.pop_exit_reason(_state(), slot, worker.pid)
    _reaped(worker, lifecycle.exit_reason(getattr(worker, "aborted", False), reported))


def _reaped(worker: Any, reason: str) -> None:
    """Count the exit, then free the slot: its live gauges and state go before anyone reuses it."""
    slot = getattr(worker, "prometheus_slot", None)
    pid: int = worker.pid
    if slot is None or _slots.holder(slot) is not worker:
        return  # not ours, or already released
    lifecycle.worker_exited(reason, slot, pid)
    server_state.clear_worker(_state(), slot)
    slots.clear_slot_live_gauges(_directory(), slot)
    _slots.release(slot)


def nworkers_changed(server: Any, new_value: int, old_value: int | None) -> None:
    if old_value is not None:
        server_state.write_server(_state(), master_pid=os.getpid(), desired_workers=new_value)


def on_exit(server: Any) -> None:
    global _lock_fd
    if _supervisor is not None:
        metrics_process.stop(_supervisor)
    if _lock_fd is not None:
        multiproc_dir.release(_directory(), _lock_fd)
        _lock_fd = None
    sys.stdout.flush()


HOOKS = {
    "on_starting": on_starting,
    "when_ready": when_ready,
    "pre_fork": pre_fork,
    "post_fork": post_fork,
    "post_worker_init": post_worker_init,
    "worker_exit": worker_exit,
    "child_exit": child_exit,
    "nworkers_changed": nworkers_changed,
    "on_exit": on_exit,
}
