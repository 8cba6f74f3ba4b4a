"""The image's HEALTHCHECK, in Python so the image needs no curl.

Under /start.sh the metrics server's `/healthz` decides (200 only while a worker serves). Under
/start-reload.sh there is no metrics server, so any HTTP answer from the app's port means healthy.
"""

from __future__ import annotations

import http.client
from typing import Any

_ANY_ADDRESS = {"0.0.0.0", "::", ""}


def _local(host: str) -> str:
    return "127.0.0.1" if host in _ANY_ADDRESS else host


def _status(host: str, port: int, path: str, timeout: float) -> int | None:
    """HTTP status of GET path, or None when nothing listens there."""
    connection = http.client.HTTPConnection(_local(host), port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def check(values: dict[str, Any], timeout: float = 4.0) -> int:
    """Exit status for Docker: 0 healthy, 1 unhealthy."""
    status = _status(values["METRICS_HOST"], values["METRICS_PORT"], "/healthz", timeout)
    if status is not None:
        return 0 if status == 200 else 1
    app_host, app_port = values["HOST"], values["PORT"]
    if values["BIND"] and not values["BIND"].startswith("unix:"):
        app_host, _, port = values["BIND"].rpartition(":")
        app_port = int(port)
    return 0 if _status(app_host.strip("[]"), app_port, "/", timeout) is not None else 1
