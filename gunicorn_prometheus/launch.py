"""Checks of what the server will really use, made in the master before anything binds or forks.

The environment is validated by `settings.Settings.from_environ()`; this module checks the values that
only exist once Gunicorn has read its config file and `GUNICORN_CMD_ARGS` (the effective bind, worker
class, app module and control socket), and names the source of each: `PORT`, `BIND`,
`GUNICORN_CMD_ARGS` or the config file. Every mistake is one `ConfigError` line; the master prints it
and exits non-zero before anything starts (Gunicorn itself would retry a taken port for 5 s, or fork
workers that fail one after the other with a traceback).
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import ConfigError, Settings, host_of, port_of


def bind_error(source: str, host: str, port: int, err: OSError) -> ConfigError:
    """One line saying why `host:port` cannot be bound; `source` names the setting, e.g. "PORT=80"."""
    if isinstance(err, PermissionError):
        return ConfigError(
            f"{source} cannot be bound on {host} by uid {os.geteuid()}: ports below 1024 need "
            f"root or CAP_NET_BIND_SERVICE; use a port >= 1024 such as 8080 when running as non-root"
        )
    if err.errno == errno.EADDRINUSE:
        return ConfigError(f"{source} is already in use on {host}: choose a free port")
    if err.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"{source}: address {host} is not available on this machine")
    return ConfigError(f"{source} cannot be bound on {host}: {err.strerror}")


def probe_bind(host: str, port: int, source: str) -> None:
    """Fail now, in one line, where the server would fail to bind later (taken port, < 1024 as non-root)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise bind_error(source, host, port, err) from None


@dataclass(frozen=True)
class Sources:
    """Where Gunicorn's effective values came from, so an error names what the user must change."""

    settings: Settings
    conf_path: str | None
    conf_values: Mapping[str, Any]
    cmd_args: Mapping[str, Any]  # GUNICORN_CMD_ARGS, parsed by Gunicorn's own parser
    environ: Mapping[str, str]

    def bind(self, address: str) -> str:
        """`PORT=80`, `BIND='…'`, `GUNICORN_CMD_ARGS='…'` or `bind = […] in <conf>` for one address."""
        if self.cmd_args.get("bind"):
            return f"GUNICORN_CMD_ARGS={self.environ.get('GUNICORN_CMD_ARGS', '')!r}"
        written = self.conf_values.get("bind")  # shown as the user wrote it: a string or a list
        conf_bind = [written] if isinstance(written, str) else written
        if conf_bind is not None and list(conf_bind) != [self.settings.effective_bind]:
            return f"bind = {written!r} in {self.conf_path}"
        if self.settings.bind_variable == "PORT":
            return f"PORT={self.settings.port}"
        return f"BIND={self.settings.bind!r}"

    def worker_class(self, value: str) -> str:
        if self.cmd_args.get("worker_class"):
            return f"GUNICORN_CMD_ARGS={self.environ.get('GUNICORN_CMD_ARGS', '')!r}"
        return f"WORKER_CLASS={value!r}"


def check_binds(binds: Sequence[str], sources: Sources, *, probe: bool = True) -> None:
    """Every address Gunicorn will listen on is bindable and none is the metrics port."""
    settings = sources.settings
    metrics_port = settings.metrics_port
    for address in binds:
        port = port_of(address)
        if port is None:
            continue  # unix: or fd://: nothing to probe
        source = sources.bind(address)
        if port == metrics_port:
            # Blame the one the user wrote: the app's PORT default (80) is not a choice, METRICS_PORT=80 is.
            app_chosen = not (source.startswith("PORT=") and "PORT" not in sources.environ)
            if "METRICS_PORT" in sources.environ and not app_chosen:
                raise ConfigError(
                    f"METRICS_PORT={metrics_port} is invalid: it is also the app's port ({address}); "
                    "metrics are never served on the app's port, choose another"
                )
            raise ConfigError(
                f"{source} is invalid: port {port} is the metrics port (METRICS_PORT={metrics_port}); "
                "choose another port for the app, or move the metrics with METRICS_PORT"
            )
        if probe:
            probe_bind(host_of(address) or "0.0.0.0", port, source)
    # The metrics port is not probed: the master has bound it already (see early_start).


# Gunicorn's own worker classes that speak ASGI; every other built-in one (sync, gthread, eventlet,
# gevent, tornado) calls the app as WSGI, and an ASGI app would fail every request.
_ASGI_MODULES = ("uvicorn", "uvicorn_worker", "gunicorn.workers.gasgi")


def check_worker_class(load: Any, source: str) -> type:
    """The worker class loads, is a Gunicorn worker, and serves ASGI. `load` is Gunicorn's loader."""
    from gunicorn.workers.base import Worker

    expected = "an ASGI Gunicorn worker class such as uvicorn_worker.UvicornWorker, or asgi"
    try:
        cls = load()
    except Exception:
        raise ConfigError(f"{source} is invalid: expected {expected}; it cannot be imported") from None
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise ConfigError(f"{source} is invalid: expected {expected}; it is not a Gunicorn worker")
    asgi = any(
        base.__module__ == name or base.__module__.startswith(name + ".")
        for base in cls.__mro__
        for name in _ASGI_MODULES
    )
    if not asgi:
        raise ConfigError(f"{source} is invalid: expected {expected}; {cls.__name__} serves WSGI apps only")
    return cls


def app_source(settings: Settings, environ: Mapping[str, str], uri: str) -> tuple[str, str]:
    """The variables to blame for the module and for the attribute of `uri`."""
    if environ.get("APP_MODULE") == uri:
        return f"APP_MODULE={uri!r}", f"APP_MODULE={uri!r}"
    module, _, attribute = uri.partition(":")
    module_source = f"MODULE_NAME={module!r}" if environ.get("MODULE_NAME") else f"module {module!r}"
    return module_source, f"VARIABLE_NAME={attribute or 'application'!r}"


def check_app(uri: str | None, settings: Settings, environ: Mapping[str, str]) -> None:
    """The app's module can be found and defines the variable, without running the app's module.

    Only its parent packages are imported (find_spec needs them); the module itself is parsed, not run,
    so the app is imported once, by each worker. A module whose names are not all visible to a parser
    (a star import, a module __getattr__) is given the benefit of the doubt: Gunicorn's worker reports
    it then (see `application.Application.load`).
    """
    if not uri:
        app_dir = settings.app_dir
        if not os.path.isdir(app_dir):
            raise ConfigError(f"APP_DIR={app_dir!r} is invalid: expected the directory of your app")
        raise ConfigError(
            f"MODULE_NAME is not set and neither {app_dir}/app/main.py nor {app_dir}/main.py exists: "
            "put your app there or set MODULE_NAME (or APP_MODULE)"
        )
    module, _, attribute = uri.partition(":")
    module_source, attribute_source = app_source(settings, environ, uri)
    try:
        spec = importlib.util.find_spec(module)
    except Exception:
        spec = None
    if spec is None:
        raise ConfigError(
            f"{module_source} is invalid: no module {module!r} can be imported from "
            f"{settings.app_dir} or the Python path"
        )
    name = (attribute or "application").split("(")[0].strip()
    if not name.isidentifier() or spec.origin is None or not spec.origin.endswith(".py"):
        return
    try:
        tree = ast.parse(Path(spec.origin).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return  # the worker reports a syntax error with its line, which a one-liner here would hide
    if not _may_define(tree, name):
        raise ConfigError(
            f"{attribute_source} is invalid: module {module!r} ({spec.origin}) defines no {name!r}; "
            "expected the name of the variable that holds the ASGI app"
        )


def _may_define(tree: ast.Module, name: str) -> bool:
    """Whether the module's top level may bind `name` (conservative: True when it cannot tell)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            return True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name in (
            name,
            "__getattr__",
        ):
            return True
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store):
            return True
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name.split(".")[0]) == name:
                    return True
        if isinstance(node, ast.Global) and name in node.names:
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("globals", "setattr", "exec"):
            return True
    return False


def check_control_socket(cfg: Any, environ: Mapping[str, str]) -> None:
    """Where Gunicorn will create its control socket is usable (a read-only root would fail later)."""
    if getattr(cfg, "control_socket_disable", True):
        return
    path = Path(cfg.control_socket)
    source = (
        f"GUNICORN_CONTROL_SOCKET={str(path)!r}"
        if environ.get("GUNICORN_CONTROL_SOCKET")
        else f"control_socket={str(path)!r}"
    )
    if path.exists() and not path.is_socket():
        raise ConfigError(f"{source} is invalid: it exists and is not a socket; expected a free path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # Gunicorn creates missing directories: the nearest existing one decides
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{source} is invalid: {parent} is not a writable directory; expected a path this user "
            "can create, or an empty GUNICORN_CONTROL_SOCKET to keep the control socket off"
        )


def check_conf_file(path: str, settings: Settings, environ: Mapping[str, str]) -> None:
    """The config file exists and is readable (Gunicorn's `python:module` form is Gunicorn's to check)."""
    if path.startswith("python:"):
        return
    path = path.removeprefix("file:")
    if not (Path(path).is_file() and os.access(path, os.R_OK)):
        variable = "GUNICORN_CONF"
        if not environ.get("GUNICORN_CONF") and path == settings.default_gunicorn_conf:
            variable = "DEFAULT_GUNICORN_CONF"
        raise ConfigError(f"{variable}={path!r} is invalid: expected a readable Gunicorn configuration file")


def check_reload(settings: Settings) -> None:
    """What /start-reload.sh needs: an app that can be found (no Gunicorn, so nothing else applies)."""
    if settings.app_dir not in sys.path:
        sys.path.insert(0, settings.app_dir)
    check_app(settings.app, settings, os.environ)
