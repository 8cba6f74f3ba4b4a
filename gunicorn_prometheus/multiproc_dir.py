"""The PROMETHEUS_MULTIPROC_DIR lifecycle: a directory of this server's own, emptied at every start.

Stale files from an earlier run would resurrect old counter values (in a container, pids and so file
names repeat after a restart), so the master empties the directory before any worker exists. A second
server pointed at the same directory would wipe the first one's live data, so the master holds an
exclusive lock on it for its whole life and refuses to start when another server holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from . import shared_state
from .settings import ConfigError

LOCK_NAME = ".lock"
STATE_DIR = shared_state.STATE_DIR


def prepare(directory: str | os.PathLike[str]) -> int:
    """Create or empty `directory`, lock it for this process; return the lock's file descriptor.

    Raises ConfigError (one line) when the path is not a writable directory owned by this user, or when
    another live server uses it. Only our own files (metric `*.db`, `*.cells`, our state) are removed.
    """
    path = Path(directory)
    variable = "PROMETHEUS_MULTIPROC_DIR"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{variable}={str(path)!r} is invalid: it exists and is not a directory") from None
    except OSError as err:
        raise ConfigError(f"{variable}={str(path)!r} cannot be created: {err.strerror}") from None
    if not path.is_dir():
        raise ConfigError(f"{variable}={str(path)!r} is invalid: it exists and is not a directory")
    stat = path.stat()
    if stat.st_uid != os.geteuid():
        raise ConfigError(
            f"{variable}={str(path)!r} is invalid: it belongs to uid {stat.st_uid}, not to this server's "
            f"uid {os.geteuid()}; give each server a directory of its own"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{variable}={str(path)!r} is invalid: it is not writable by this server")

    lock_fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise ConfigError(
            f"{variable}={str(path)!r} is in use by another running server; "
            "give each server its own directory"
        ) from None
    # prometheus_client's files, our HTTP cells (and any a killed worker was still allocating: *.tmp)
    for stale in (
        *path.glob("*.db"),
        *path.glob("*.cells"),
        *path.glob("*.db.tmp"),
        *path.glob("*.cells.tmp"),
    ):
        stale.unlink(missing_ok=True)
    shutil.rmtree(path / STATE_DIR, ignore_errors=True)
    (path / STATE_DIR).mkdir(mode=0o700)
    try:
        shared_state.create(path)
    except OSError as err:
        os.close(lock_fd)
        raise ConfigError(
            f"{variable}={str(path)!r} cannot hold this server's state "
            f"({shared_state.TABLE_SIZE // 1024} KiB): {err.strerror}"
        ) from None
    return lock_fd


#: prometheus_client gives each metric file 64 KiB to start with, and a worker usually has three: the HTTP
#: duration histogram, the in-progress gauge and the app's own counters. The master has as many at most.
FILE_BYTES = 1 << 16
FILES_PER_PROCESS = 3


def check_space(directory: str | os.PathLike[str], workers: int) -> None:
    """Refuse, in one line, a directory whose filesystem cannot hold the metric files `workers` start with.

    Running out later costs metrics, not requests (see metric_files), but a directory too small from the
    start is a configuration mistake worth stopping for: a container's /dev/shm is 64 MiB by default, yet
    some runtimes give far less.
    """
    try:
        stat = os.statvfs(directory)
    except OSError:
        return  # not our business here: prepare() already proved the directory usable
    free = stat.f_bavail * stat.f_frsize
    need = (workers + 1) * FILES_PER_PROCESS * FILE_BYTES
    if free < need:
        raise ConfigError(
            f"PROMETHEUS_MULTIPROC_DIR={os.fspath(directory)!r} has {free // 1024} KiB free, but "
            f"{workers} workers and the master need about {need // 1024} KiB for their metric files: give "
            "it more space (e.g. docker run --shm-size=64m) or point it at a larger directory"
        )


def release(directory: str | os.PathLike[str], lock_fd: int) -> None:
    """On a clean stop: remove our files (the directory too when that leaves it empty) and unlock.

    In a container /dev/shm goes away with it anyway; on a host it would otherwise keep the last run's
    files in memory until the next start.
    """
    path = Path(directory)
    shared_state.forget(path)
    for ours in (
        *path.glob("*.db"),
        *path.glob("*.cells"),
        *path.glob("*.db.tmp"),
        *path.glob("*.cells.tmp"),
    ):
        ours.unlink(missing_ok=True)
    shutil.rmtree(path / STATE_DIR, ignore_errors=True)
    (path / LOCK_NAME).unlink(missing_ok=True)
    os.close(lock_fd)
    with contextlib.suppress(OSError):
        path.rmdir()


def state_dir(directory: str | os.PathLike[str]) -> Path:
    """Where the master and workers leave the small facts the metrics process reads (not metric files)."""
    return Path(directory) / STATE_DIR
