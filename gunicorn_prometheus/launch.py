"""What /start.sh and /start-reload.sh decide before Gunicorn (or Uvicorn) starts.

`resolve()` reproduces upstream's start-up decisions (module detection, the GUNICORN_CONF search order,
the prestart path) and then validates every setting, so that a configuration mistake is one line on
stderr and a non-zero exit before anything forks, instead of a traceback from a worker.
The shell scripts `eval` the `export` lines that `shell_exports()` prints.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shlex
import socket
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from . import settings
from .settings import ConfigError

_BUILTIN_WORKERS = {"sync", "eventlet", "gevent", "tornado", "gthread", "asgi"}


def detect_module(app_dir: Path) -> str | None:
    """Upstream's detection: `app.main` if app/main.py exists, else `main` if main.py exists."""
    if (app_dir / "app" / "main.py").is_file():
        return "app.main"
    if (app_dir / "main.py").is_file():
        return "main"
    return None


def find_gunicorn_conf(app_dir: Path, bundled: str) -> str:
    """Upstream's search order: the app's own config file first, else the bundled one."""
    for candidate in (app_dir / "gunicorn_conf.py", app_dir / "app" / "gunicorn_conf.py"):
        if candidate.is_file():
            return str(candidate)
    return bundled


def default_multiproc_dir(metrics_port: int) -> str:
    """A directory of this server's own, memory-backed where /dev/shm is writable.

    The metrics port is part of the name: two servers on one host cannot share a metrics port, so they
    cannot share this directory either.
    """
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
    return str(base / f"gunicorn-prometheus-{metrics_port}")


def _module_importable(module: str, search_path: list[str]) -> bool:
    """Whether `module` can be found, without running the app's module itself (only its packages)."""
    old_path = sys.path[:]
    sys.path[:0] = search_path
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
    finally:
        sys.path[:] = old_path


def _port_of(bind: str) -> int | None:
    if bind.startswith("unix:"):
        return None
    return int(bind.rpartition(":")[2])


def _host_of(bind: str) -> str:
    return bind.rpartition(":")[0].strip("[]")


def bind_error(variable: str, host: str, port: int, err: OSError) -> ConfigError:
    """One line saying why `host:port` cannot be bound, naming the variable and what to do."""
    if isinstance(err, PermissionError):
        return ConfigError(
            f"{variable}={port} cannot be bound on {host} by uid {os.geteuid()}: ports below 1024 need "
            f"root or CAP_NET_BIND_SERVICE; use a port >= 1024 such as 8080 when running as non-root"
        )
    if err.errno == errno.EADDRINUSE:
        return ConfigError(f"{variable}={port} is already in use on {host}: choose a free port")
    if err.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"{variable}: address {host} is not available on this machine")
    return ConfigError(f"{variable}={port} cannot be bound on {host}: {err.strerror}")


def probe_bind(host: str, port: int, variable: str) -> None:
    """Fail now, in one line, where the server would fail to bind later (taken port, < 1024 as non-root)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise bind_error(variable, host, port, err) from None


def resolve(
    environ: MutableMapping[str, str], *, gunicorn: bool = True, probe_ports: bool = True
) -> dict[str, str]:
    """Fill in the derived variables and validate everything; return what the shell must export.

    Raises ConfigError (one line per mistake) for any invalid value.
    """
    values = settings.load(environ)
    app_dir = Path(values["APP_DIR"])
    exports: dict[str, str] = {}

    module = values["MODULE_NAME"] or detect_module(app_dir)
    app_module = values["APP_MODULE"]
    if app_module is None:
        if module is None:
            raise ConfigError(
                f"MODULE_NAME is not set and neither {app_dir}/app/main.py nor {app_dir}/main.py exists: "
                "put your app there or set MODULE_NAME (or APP_MODULE)"
            )
        app_module = f"{module}:{values['VARIABLE_NAME']}"
        exports["MODULE_NAME"] = module
    exports["VARIABLE_NAME"] = values["VARIABLE_NAME"]
    exports["APP_MODULE"] = app_module
    search_path = [str(app_dir), os.getcwd()]
    module_of_app = app_module.partition(":")[0]
    if not _module_importable(module_of_app, search_path):
        variable = "APP_MODULE" if values["APP_MODULE"] else "MODULE_NAME"
        raise ConfigError(
            f"{variable}={environ.get(variable, module_of_app)!r} is invalid: no module {module_of_app!r} "
            f"can be imported from {app_dir} or the Python path"
        )

    exports["PRE_START_PATH"] = values["PRE_START_PATH"] or str(app_dir / "prestart.sh")
    # The image sets PYTHONPATH=/app; outside it, the app directory must be importable all the same, as
    # the check above assumed.
    python_path = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(app_dir) not in python_path:
        exports["PYTHONPATH"] = os.pathsep.join([str(app_dir), *python_path])
    if not gunicorn:
        return exports

    conf = values["GUNICORN_CONF"] or find_gunicorn_conf(app_dir, values["DEFAULT_GUNICORN_CONF"])
    if not os.access(conf, os.R_OK) or not Path(conf).is_file():
        raise ConfigError(
            f"GUNICORN_CONF={conf!r} is invalid: expected a readable Gunicorn configuration file"
        )
    exports["GUNICORN_CONF"] = conf

    worker_class = values["WORKER_CLASS"]
    if worker_class not in _BUILTIN_WORKERS:
        module_name = worker_class.rpartition(".")[0]
        if not module_name or not _module_importable(module_name, search_path):
            raise ConfigError(
                f"WORKER_CLASS={worker_class!r} is invalid: expected an importable worker class such as "
                "uvicorn_worker.UvicornWorker, or asgi"
            )
    exports["WORKER_CLASS"] = worker_class

    bind = values["BIND"] or f"{values['HOST']}:{values['PORT']}"
    if _port_of(bind) == values["METRICS_PORT"]:
        raise ConfigError(
            f"METRICS_PORT={values['METRICS_PORT']} is invalid: it is also the app's port ({bind}); "
            "metrics are never served on the app's port, choose another"
        )
    if probe_ports:
        if (port := _port_of(bind)) is not None:
            probe_bind(_host_of(bind), port, "BIND" if values["BIND"] else "PORT")
        probe_bind(values["METRICS_HOST"], values["METRICS_PORT"], "METRICS_PORT")

    exports["PROMETHEUS_MULTIPROC_DIR"] = values["PROMETHEUS_MULTIPROC_DIR"] or default_multiproc_dir(
        values["METRICS_PORT"]
    )
    return exports


def shell_exports(exports: Mapping[str, str]) -> str:
    """`export NAME=value` lines, quoted for the shell that evals them."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in exports.items())
