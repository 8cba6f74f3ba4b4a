"""Gunicorn settings computed from the environment, with the metrics hooks wired in.

The image's `/gunicorn_conf.py` is two lines that load this. A user's own `gunicorn_conf.py` can do the
same and then change what it needs:

    from gunicorn_prometheus.conf import gunicorn_settings
    globals().update(gunicorn_settings())
    timeout = 30

GUNICORN_CMD_ARGS still wins over all of it: Gunicorn applies it after the config file.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from . import cpu, launch, settings
from .settings import ConfigError


def gunicorn_settings(environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    """Gunicorn's settings for this environment; exits with one line on a configuration error.

    Also sets PROMETHEUS_MULTIPROC_DIR in the environment when it is missing, before anything imports
    prometheus_client's multiprocess mode (the hooks do, in the master, before workers fork).
    """
    environ = os.environ if environ is None else environ
    try:
        values = settings.load(environ)
    except ConfigError as err:
        lines = str(err).splitlines()
        raise SystemExit(
            "\n".join(f"gunicorn-prometheus: configuration error: {line}" for line in lines)
        ) from None
    environ.setdefault("PROMETHEUS_MULTIPROC_DIR", launch.default_multiproc_dir(values["METRICS_PORT"]))

    limit = cpu.detect(Path(values["CGROUP_ROOT"]))
    workers = cpu.worker_count(
        limit.count, values["WORKERS_PER_CORE"], values["MAX_WORKERS"], values["WEB_CONCURRENCY"]
    )
    bind = values["BIND"] or f"{values['HOST']}:{values['PORT']}"

    from . import hooks  # imports prometheus_client: only now that the directory is in the environment

    hooks.prepare_master()

    hooks.configure(
        {
            # upstream's remaining keys of the start-up JSON line
            "workers_per_core": values["WORKERS_PER_CORE"],
            "use_max_workers": values["MAX_WORKERS"] or None,
            "host": values["HOST"],
            "port": values["PORT"],
            # ours
            "cpu_count": limit.count,
            "cpu_source": limit.source,
            "metrics_host": values["METRICS_HOST"],
            "metrics_port": values["METRICS_PORT"],
            "instrument": values["METRICS_INSTRUMENT"],
            "app_name": values["METRICS_APP_NAME"],
            "buckets": values["METRICS_BUCKETS"],
            "skip_paths": sorted(values["METRICS_SKIP_PATHS"]),
            "flush_interval": values["METRICS_FLUSH_INTERVAL"],
            "saturation": values["METRICS_SATURATION"],
        }
    )
    result: dict[str, Any] = {
        "bind": [bind],
        "workers": workers,
        "loglevel": values["LOG_LEVEL"],
        "timeout": values["TIMEOUT"],
        "graceful_timeout": values["GRACEFUL_TIMEOUT"],
        "keepalive": values["KEEP_ALIVE"],
        "accesslog": values["ACCESS_LOG"],
        "errorlog": values["ERROR_LOG"],
        "worker_tmp_dir": "/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
        **hooks.HOOKS,
    }
    if values["GUNICORN_CONTROL_SOCKET"]:
        result["control_socket"] = values["GUNICORN_CONTROL_SOCKET"]
    else:
        result["control_socket_disable"] = True
    return result
