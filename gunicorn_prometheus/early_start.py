"""What the master does first, before it imports Gunicorn: lock the metrics directory, bind the metrics
port and start the metrics side.

Why first: the metrics peer is a fresh interpreter whose imports take about 0.2 s of CPU. Started here,
it boots on another core while the master imports Gunicorn, reads the config file and checks it (one
core's work); started once Gunicorn is ready (when_ready), it competed with the workers' own boot, and
the first answer came about that much later (issue 12: start-up time). This module imports nothing heavy
for the same reason.

A start that fails afterwards (a mistake the config file holds, say) stops what was started here before
the master exits: see `application.serve`. A taken METRICS_PORT fails here, in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import launch, metrics_process, multiproc_dir
from .settings import ConfigError, Settings


@dataclass
class Started:
    """What the master owns from here on: the directory's lock and the metrics side."""

    lock_fd: int
    metrics: metrics_process.MetricsSide


def lock_directory(directory: str) -> int:
    """Empty and lock the multiprocess directory (see multiproc_dir.prepare); its lock's descriptor."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # for the metrics side, the app and its workers
    try:
        return multiproc_dir.prepare(directory)
    except OSError as err:
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR={directory!r} cannot be used: {err.strerror}") from None


def start_metrics(settings: Settings) -> metrics_process.MetricsSide:
    """Bind the metrics port in this process (a taken port is a one-line error) and start the peers.

    The returned side keeps this process's copy of the listening socket, to start a new pair should every
    peer be gone (metrics_process); each worker closes it as it forks (Master.post_fork), and `stop`
    closes it here.
    """
    host, port = settings.metrics_host, settings.metrics_port
    try:
        sock = metrics_process.bind_metrics_socket(host, port)
    except OSError as err:
        raise launch.bind_error(f"METRICS_PORT={port}", host, port, err) from None
    try:
        return metrics_process.start(sock, master_pid=os.getpid(), directory=settings.multiproc_dir)
    except BaseException:
        sock.close()
        raise


def start(settings: Settings) -> Started:
    """The directory, then the metrics side; nothing is left locked or running when this fails."""
    lock_fd = lock_directory(settings.multiproc_dir)
    try:
        return Started(lock_fd, start_metrics(settings))
    except BaseException:
        multiproc_dir.release(settings.multiproc_dir, lock_fd)
        raise
