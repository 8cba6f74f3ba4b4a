"""Gunicorn settings computed from the environment: what the bundled /gunicorn_conf.py sets and prints.

Our hooks do not come from here: the master installs them whatever config file is used (see
`application`), so a user's own `gunicorn_conf.py` needs nothing of ours. One that wants our computed
values (the worker count from the container's CPUs, say) can still start from them:

    from gunicorn_prometheus.conf import gunicorn_settings
    globals().update(gunicorn_settings())
    timeout = 30

GUNICORN_CMD_ARGS still wins over all of it: Gunicorn applies it after the config file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from . import cpu
from .settings import ConfigError, Settings, current


def upstream_config_line(settings: Settings, workers: int, limit: cpu.CpuLimit) -> dict[str, Any]:
    """Upstream's start-up JSON (its keys, value types and derivations), then ours.

    As upstream prints it: `host` and `port` are the environment's strings, `loglevel` is LOG_LEVEL's
    value even when GUNICORN_CMD_ARGS changes Gunicorn's, `bind` is one string. Tools written for the
    upstream image run `python <config file>` and parse this line.
    """
    line: dict[str, Any] = {
        "loglevel": settings.log_level,
        "workers": workers,
        "bind": settings.effective_bind,
        "graceful_timeout": settings.graceful_timeout,
        "timeout": settings.timeout,
        "keepalive": settings.keep_alive,
        "errorlog": settings.error_log,
        "accesslog": settings.access_log,
        "workers_per_core": settings.workers_per_core,
        "use_max_workers": settings.max_workers or None,
        "host": settings.host,
        "port": str(settings.port),
        # ours
        "worker_class": settings.worker_class,
        "cpu_count": limit.count,
        "cpu_source": limit.source,
        "metrics_host": settings.metrics_host,
        "metrics_port": settings.metrics_port,
        "multiproc_dir": settings.multiproc_dir,
        "instrument": settings.metrics_instrument,
        "app_name": settings.metrics_app_name,
        "buckets": settings.metrics_buckets,
        "skip_paths": sorted(settings.metrics_skip_paths),
    }
    if "METRICS_SATURATION" in settings.values:
        line["saturation"] = settings.value("METRICS_SATURATION")
    return line


PLAIN_GUNICORN_WARNING = (
    "gunicorn-prometheus: warning: this configuration is loaded by a plain `gunicorn` command, which runs "
    "none of our hooks: no metrics server, no HTTP metrics. Start Gunicorn as `python -m gunicorn_prometheus "
    "serve` with the same arguments (what /start.sh does)."
)


def under_plain_gunicorn() -> bool:
    """Whether a Gunicorn master other than ours is loading this configuration.

    A user's own CMD (``gunicorn -c /gunicorn_conf.py main:app``, as some upstream users write) serves
    the app without any of our metrics, silently unless we say so. Our master imports
    `gunicorn_prometheus.application` before it reads a config file; `python /gunicorn_conf.py` imports
    no Gunicorn at all.
    """
    return "gunicorn.app.base" in sys.modules and "gunicorn_prometheus.application" not in sys.modules


def gunicorn_settings(*, print_config: bool = True) -> dict[str, Any]:
    """Gunicorn's settings for this environment; prints upstream's JSON line (as upstream's file does).

    Exits with one line per mistake on a configuration error (the master has normally reported it
    before any config file is read; this covers `python /gunicorn_conf.py` run by hand).
    """
    try:
        settings = current()
    except ConfigError as err:
        lines = str(err).splitlines()
        raise SystemExit(
            "\n".join(f"gunicorn-prometheus: configuration error: {line}" for line in lines)
        ) from None
    limit = cpu.detect(Path(settings.cgroup_root))
    workers = cpu.worker_count(
        limit.count, settings.workers_per_core, settings.max_workers, settings.web_concurrency
    )
    if print_config:
        print(json.dumps(upstream_config_line(settings, workers, limit)), flush=True)
    if under_plain_gunicorn():
        print(PLAIN_GUNICORN_WARNING, file=sys.stderr, flush=True)
    return {
        "bind": [settings.effective_bind],
        "workers": workers,
        "loglevel": settings.log_level,
        "timeout": settings.timeout,
        "graceful_timeout": settings.graceful_timeout,
        "keepalive": settings.keep_alive,
        "accesslog": settings.access_log,
        "errorlog": settings.error_log,
        "worker_tmp_dir": "/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
    }
