"""The image's HEALTHCHECK, in Python so the image needs no curl.

Under /start.sh the metrics server's `/healthz` decides (200 only while a worker serves), and nothing else:
if the metrics server cannot answer, the container is unhealthy, even though the app may still answer.
Under /start-reload.sh there is no metrics server, so any HTTP answer from the app's port means healthy.

Telling the two apart: the Gunicorn master holds an exclusive lock on its multiprocess directory for its
whole life (multiproc_dir.prepare), and Uvicorn's reloader never takes it. A lock is a kernel fact, true
whatever the process names, pid namespace or user, and it goes away with the master.
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import os
import ssl

from . import multiproc_dir
from .settings import Settings

_ANY_ADDRESS = {"0.0.0.0", "::", ""}


def _local(host: str) -> str:
    return "127.0.0.1" if host in _ANY_ADDRESS else host


def _status(host: str, port: int, path: str, timeout: float, tls: bool = False) -> int | None:
    """HTTP status of GET path, or None when nothing answers there."""
    if tls:
        # Our own server on loopback: its certificate names the public host, not 127.0.0.1.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            _local(host), port, timeout=timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(_local(host), port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def gunicorn_running(directory: str) -> bool:
    """Whether a Gunicorn master of ours holds the lock of `directory` right now.

    Read from /proc/locks rather than by trying the lock: taking it, even shared and for an instant,
    could make a master starting at that moment refuse the directory as in use.
    """
    try:
        st = os.stat(os.path.join(directory, multiproc_dir.LOCK_NAME))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # there, but not ours to see: treat it as held (fail closed)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            return any(
                fields[1] == "FLOCK" and device in fields
                for fields in (line.split() for line in locks)
                if len(fields) > 5
            )
    except OSError:
        pass
    try:  # no /proc/locks: probe, accepting the tiny window described above
        fd = os.open(os.path.join(directory, multiproc_dir.LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        return err.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


def _metrics_tls(settings: Settings) -> bool:
    web_config_path = settings.values.get("METRICS_WEB_CONFIG")
    if not web_config_path:
        return False
    from . import web_config

    return web_config.load(web_config_path).tls


def check(settings: Settings, timeout: float = 4.0) -> int:
    """Exit status for Docker: 0 healthy, 1 unhealthy."""
    if gunicorn_running(settings.multiproc_dir):
        status = _status(
            settings.metrics_host, settings.metrics_port, "/healthz", timeout, tls=_metrics_tls(settings)
        )
        return 0 if status == 200 else 1
    if settings.app_port is None:
        return 1
    return 0 if _status(settings.app_host, settings.app_port, "/", timeout) is not None else 1
