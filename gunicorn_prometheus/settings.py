"""Every environment variable the image reads, declared once, and the typed `Settings` built from them.

Each `Setting` carries its name, its README section, its default, the parser that validates it and the
one line of documentation that the README table is generated from (`python -m gunicorn_prometheus
settings-table`), in the manner of Gunicorn's own ``config.py``. `Settings.from_environ()` parses all of
them at once, before anything forks, turns every mistake into a `ConfigError` whose message is one line
naming the variable, the value and what was expected, and computes the derived values (the effective
bind, the app module, the config file, the multiprocess directory) in this one place, so the master, the
config file and the health check cannot disagree about them.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import web_config


class ConfigError(ValueError):
    """A configuration mistake, reported to the user as one line (never as a traceback)."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: how it is read and what the README says about it."""

    name: str
    section: str
    parse: Callable[[str], Any]
    doc: str
    default: str | None = None  # raw text, parsed like a user's value; None means "unset"
    default_doc: str | None = None  # for defaults that are computed, shown instead of `default`
    empty_is_value: bool = False  # False: an empty value means "use the default", as most users expect


# --- parsers: each takes the raw text and returns the value, or raises ValueError(<what is expected>) ---


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(expected) from None
        if value < low or (high is not None and value > high):
            raise ValueError(expected)
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("a number > 0, such as 1 or 0.5") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("a number > 0, such as 1 or 0.5")
    return value


def _non_negative_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("a number >= 0, such as 0.1") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("a number >= 0, such as 0.1")
    return value


def _seconds(raw: str) -> int:
    return _int_in(0)(raw)


_PORT = _int_in(1, 65535)
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _module_name(raw: str) -> str:
    if not _DOTTED.match(raw):
        raise ValueError("a dotted Python module name such as app.main")
    return raw


def _identifier(raw: str) -> str:
    if not raw.isidentifier():
        raise ValueError("a Python variable name such as app")
    return raw


def _app_module(raw: str) -> str:
    module, _, attribute = raw.partition(":")
    if not _DOTTED.match(module) or (":" in raw and not attribute):
        raise ValueError("module:variable, such as app.main:app")
    return raw


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("a non-empty value")
    return raw.strip()


def _bind(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith("unix:") and len(raw) > 5:
        return raw
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ValueError("host:port such as 0.0.0.0:80, or unix:/path/to.sock")
    try:
        _PORT(port)
    except ValueError:
        raise ValueError("host:port with a port from 1 to 65535, such as 0.0.0.0:80") from None
    return raw


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in _LOG_LEVELS:
        raise ValueError("one of " + ", ".join(_LOG_LEVELS))
    return value


def _log_target(raw: str) -> str | None:
    """Upstream's convention: '-' is the console, an empty value turns the log off."""
    value = raw.strip()
    if value and value != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(value))):
        raise ValueError("'-' (the console), empty (off), or a file in an existing directory")
    return value or None


def _path(raw: str) -> str:
    if raw[:1] in "\"'" and raw[-1:] == raw[:1] and len(raw) >= 2:
        raise ValueError(
            "a path without surrounding quotes "
            '(docker-compose keeps quotes written in `KEY="value"` list items)'
        )
    if not raw.strip():
        raise ValueError("a file system path")
    return raw


def _worker_class(raw: str) -> str:
    raw = raw.strip()
    if not (raw.isidentifier() or _DOTTED.match(raw)):
        raise ValueError("a Gunicorn worker class such as uvicorn_worker.UvicornWorker or asgi")
    return raw


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _buckets(raw: str) -> tuple[float, ...]:
    expected = "increasing numbers separated by commas, such as 0.01,0.1,1,10"
    try:
        values = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(expected) from None
    if (
        not values
        or any(b <= a for a, b in zip(values, values[1:], strict=False))
        or not all(map(math.isfinite, values))
    ):
        raise ValueError(expected)
    return values


_REGEX_CHARS = re.compile(r"[\\^$|?*+()\[\]{}]")


def _paths(raw: str) -> frozenset[str]:
    """Exact paths, or regular expressions matched against the whole path (as starlette_exporter's)."""
    expected = "URL paths starting with / separated by commas, such as /health,/ready or /static/.*"
    paths = frozenset(part.strip() for part in raw.split(",") if part.strip())
    for path in sorted(paths):
        if not path.startswith("/"):
            raise ValueError(expected)
        if _REGEX_CHARS.search(path):
            try:
                re.compile(path)
            except re.error as err:
                raise ValueError(f"{expected}; {path!r} is not a valid regular expression ({err})") from None
    return paths


# Kernel pseudo file systems: a directory there cannot hold files (or holds the kernel's own).
_PSEUDO_FS = ("/proc", "/sys", "/dev/pts")


def _directory(raw: str) -> str:
    path = _path(raw)
    if not os.path.isabs(path):
        raise ValueError("an absolute directory path such as /dev/shm/metrics")
    normal = os.path.normpath(path)
    if any(normal == fs or normal.startswith(fs + "/") for fs in _PSEUDO_FS):
        raise ValueError("a directory on a writable file system, not under /proc, /sys or /dev/pts")
    return path


def _socket_path(raw: str) -> str:
    """Empty (off), or where Gunicorn may create its control socket."""
    if not raw.strip():
        return ""
    path = _path(raw)
    if not os.path.isabs(path):
        raise ValueError("an absolute path for a Unix socket such as /tmp/gunicorn.ctl, or empty for off")
    return path


def _gunicorn_args(raw: str) -> str:
    """Options Gunicorn's own parser accepts (it reads them itself; a mistake there prints a usage page)."""
    import contextlib
    import io
    import shlex

    from gunicorn.config import Config

    expected = "Gunicorn command-line options such as --log-level debug"
    try:
        args = shlex.split(raw)
    except ValueError as err:
        raise ValueError(f"{expected} ({err})") from None
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            Config().parser().parse_args(args)
    except SystemExit:
        reason = (errors.getvalue().strip().splitlines() or ["not accepted"])[-1]
        raise ValueError(f"{expected} ({reason.partition('error: ')[2] or reason})") from None
    return raw


def _absolute_path(raw: str) -> str:
    path = _path(raw)
    if not os.path.isabs(path):
        raise ValueError("an absolute path")
    return path


# prometheus_client's Histogram.DEFAULT_BUCKETS (without +Inf), written out rather than imported: this
# module is imported first, before the master starts the metrics peer, and prometheus_client would
# make that ~50 ms later (issue 12: start-up time). A unit test keeps the two equal.
_DEFAULT_BUCKETS = "0.005,0.01,0.025,0.05,0.075,0.1,0.25,0.5,0.75,1.0,2.5,5.0,7.5,10.0"

UPSTREAM = "upstream"
METRICS = "metrics"
PATHS = "paths"

SETTINGS: tuple[Setting, ...] = (
    # --- the application (upstream names and defaults) ---
    Setting(
        "MODULE_NAME",
        UPSTREAM,
        _module_name,
        "Python module holding the app.",
        default_doc="`app.main` if `$APP_DIR/app/main.py` exists, else `main` if `$APP_DIR/main.py` exists",
    ),
    Setting(
        "VARIABLE_NAME",
        UPSTREAM,
        _identifier,
        "Variable in that module that holds the ASGI app.",
        default="app",
    ),
    Setting(
        "APP_MODULE",
        UPSTREAM,
        _app_module,
        "`module:variable` given to Gunicorn; overrides the two above.",
        default_doc="`$MODULE_NAME:$VARIABLE_NAME`",
    ),
    Setting(
        "GUNICORN_CONF",
        UPSTREAM,
        _path,
        "Gunicorn configuration file.",
        default_doc="first that exists of `$APP_DIR/gunicorn_conf.py`, `$APP_DIR/app/gunicorn_conf.py`, "
        "else `$DEFAULT_GUNICORN_CONF`",
    ),
    Setting(
        "PRE_START_PATH",
        UPSTREAM,
        _path,
        "Script sourced before the server starts (migrations, waiting for a database…).",
        default_doc="`$APP_DIR/prestart.sh`",
    ),
    # --- the worker processes ---
    Setting(
        "WORKERS_PER_CORE",
        UPSTREAM,
        _positive_float,
        "Workers per usable CPU; the result is at least 2.",
        default="1",
    ),
    Setting(
        "MAX_WORKERS", UPSTREAM, _int_in(0), "Upper bound on the computed worker count (0 or unset: none)."
    ),
    Setting("WEB_CONCURRENCY", UPSTREAM, _int_in(1), "Exact number of workers, replacing the computation."),
    Setting(
        "WORKER_CLASS",
        UPSTREAM,
        _worker_class,
        "Gunicorn worker class, an ASGI one: `uvicorn.workers.UvicornWorker`, "
        "`uvicorn.workers.UvicornH11Worker`, `uvicorn_worker.UvicornH11Worker` and Gunicorn's native `asgi` "
        "also work.",
        default="uvicorn_worker.UvicornWorker",
    ),
    # --- the listening socket ---
    Setting("HOST", UPSTREAM, _nonempty, "Address the app listens on.", default="0.0.0.0"),
    Setting("PORT", UPSTREAM, _PORT, "Port the app listens on.", default="80"),
    Setting(
        "BIND",
        UPSTREAM,
        _bind,
        "`host:port` (or `unix:/path`) for the app; overrides HOST and PORT.",
        default_doc="`$HOST:$PORT`",
    ),
    # --- timeouts and logs ---
    Setting(
        "LOG_LEVEL", UPSTREAM, _log_level, "One of debug, info, warning, error, critical.", default="info"
    ),
    Setting(
        "TIMEOUT",
        UPSTREAM,
        _seconds,
        "Seconds of silence after which a worker is killed and replaced. Uvicorn workers report every "
        "TIMEOUT/2 s, so an event loop blocked for more than TIMEOUT/2 to TIMEOUT seconds gets its worker "
        "killed (as in upstream).",
        default="120",
    ),
    Setting(
        "GRACEFUL_TIMEOUT",
        UPSTREAM,
        _seconds,
        "Seconds in-flight requests get to finish on stop or reload. Keep it below the orchestrator's "
        "stop grace (Docker 10 s, Kubernetes 30 s); upstream's 120 got workers SIGKILLed.",
        default="8",
    ),
    Setting(
        "KEEP_ALIVE", UPSTREAM, _seconds, "Seconds an idle keep-alive connection is kept open.", default="5"
    ),
    Setting(
        "ACCESS_LOG",
        UPSTREAM,
        _log_target,
        "Access log file; `-` is stdout, empty turns it off.",
        default="-",
        empty_is_value=True,
    ),
    Setting(
        "ERROR_LOG",
        UPSTREAM,
        _log_target,
        "Error log file; `-` is stderr, empty turns it off.",
        default="-",
        empty_is_value=True,
    ),
    Setting(
        "GUNICORN_CMD_ARGS",
        UPSTREAM,
        _gunicorn_args,
        "Extra Gunicorn command-line settings; they win over every variable here and the config file.",
    ),
    Setting(
        "GUNICORN_CONTROL_SOCKET",
        UPSTREAM,
        _socket_path,
        "Path of Gunicorn's control socket (`gunicornc`); empty keeps it off, so read-only and non-root "
        "containers start cleanly.",
        default="",
    ),
    # --- metrics ---
    Setting("METRICS_HOST", METRICS, _nonempty, "Address the metrics server listens on.", default="0.0.0.0"),
    Setting(
        "METRICS_PORT",
        METRICS,
        _PORT,
        "Port of the metrics server (`/metrics`, `/healthz`); must differ from the app's.",
        default="9464",
    ),
    Setting(
        "PROMETHEUS_MULTIPROC_DIR",
        METRICS,
        _directory,
        "Directory where every process writes its metrics; emptied at start-up, must belong to this server.",
        default_doc="`/dev/shm/gunicorn-prometheus-$METRICS_PORT` (memory-backed), else under the temp "
        "directory",
    ),
    Setting(
        "METRICS_WEB_CONFIG",
        METRICS,
        web_config.parse_web_config_setting,
        "Prometheus web config file (exporter-toolkit format) for the metrics port: `tls_server_config`, "
        "`basic_auth_users` (bcrypt). `/healthz` stays open, without detail.",
    ),
    Setting(
        "METRICS_BEARER_TOKEN_FILE",
        METRICS,
        web_config.parse_token_file_setting,
        "File holding a bearer token the metrics port requires (e.g. a Kubernetes secret); re-read when "
        "it changes.",
    ),
    Setting(
        "METRICS_INSTRUMENT",
        METRICS,
        _bool,
        "Wrap the app with HTTP request metrics at worker start.",
        default="true",
    ),
    Setting(
        "METRICS_APP_NAME",
        METRICS,
        _nonempty,
        "Value of the `app_name` label of the HTTP metrics.",
        default="starlette",
    ),
    Setting(
        "METRICS_BUCKETS",
        METRICS,
        _buckets,
        "Request duration histogram buckets, in seconds.",
        default=_DEFAULT_BUCKETS,
    ),
    Setting(
        "METRICS_SATURATION",
        METRICS,
        _bool,
        "Sample each worker's event-loop lag and AnyIO thread pool ten times a second (see Saturation); "
        "false turns the sampling off.",
        default="true",
    ),
    Setting(
        "METRICS_SKIP_PATHS",
        METRICS,
        _paths,
        "Request paths left out of the HTTP metrics, comma-separated; an entry with regular expression "
        "characters (such as `/static/.*`) must match the whole path.",
        default="",
    ),
    # --- paths that are fixed in the image, overridable to run as plain processes ---
    Setting(
        "APP_DIR", PATHS, _absolute_path, "Directory of the user's app (`/app` in the image).", default="/app"
    ),
    Setting(
        "DEFAULT_GUNICORN_CONF",
        PATHS,
        _path,
        "The bundled Gunicorn configuration.",
        default="/gunicorn_conf.py",
    ),
    Setting(
        "CGROUP_ROOT",
        PATHS,
        _absolute_path,
        "Where the cgroup file systems are mounted (for CPU detection).",
        default="/sys/fs/cgroup",
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def _clean(value: str) -> str:
    return value.replace("\n", "\\n")


def parse_one(setting: Setting, environ: Mapping[str, str]) -> Any:
    """The parsed value of one setting: the user's, else the default, else None."""
    raw = environ.get(setting.name)
    if raw is None or (raw == "" and not setting.empty_is_value):
        raw = setting.default
    if raw is None:
        return None
    try:
        return setting.parse(raw)
    except ValueError as err:
        raise ConfigError(f"{setting.name}={_clean(raw)!r} is invalid: expected {err}") from None


def load(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse every declared setting; raise one ConfigError listing each bad variable on its own line."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    errors: list[str] = []
    # GUNICORN_CMD_ARGS is checked with Gunicorn's own parser, and importing Gunicorn reads (and chokes
    # on) a bad WEB_CONCURRENCY: so it comes last, and only when everything else is valid.
    ordered = sorted(SETTINGS, key=lambda s: s.name == "GUNICORN_CMD_ARGS")
    for setting in ordered:
        if errors and setting.name == "GUNICORN_CMD_ARGS":
            continue
        try:
            values[setting.name] = parse_one(setting, environ)
        except ConfigError as err:
            errors.append(str(err))
    if errors:
        raise ConfigError("\n".join(errors))
    return {s.name: values[s.name] for s in SETTINGS}


SECTION_TITLES = {
    UPSTREAM: "Upstream's settings (same names, same meaning)",
    METRICS: "Metrics",
    PATHS: "Paths fixed in the image, overridable to run as plain processes",
}


def markdown_table() -> str:
    """The README's table of environment variables, generated from `SETTINGS`, one group per section."""
    lines = ["| Variable | Default | What it does |", "|---|---|---|"]
    section = None
    for s in SETTINGS:
        if s.section != section:
            section = s.section
            lines.append(f"| **{SECTION_TITLES.get(section, section)}** | | |")
        if s.default_doc:
            default = s.default_doc
        elif s.default is None:
            default = "unset"
        elif s.default == "":
            default = "empty"
        else:
            default = f"`{s.default}`"
        lines.append(f"| `{s.name}` | {default} | {s.doc} |")
    return "\n".join(lines) + "\n"


# --- the typed, derived view ----------------------------------------------------------------------


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


@dataclass(frozen=True)
class Settings:
    """Every setting's parsed value (one field per `Setting`, lower-case), plus the values derived from them.

    Built once per process by `Settings.from_environ()`; frozen, so no later step can change what an
    earlier one validated. A `Setting` declared without a field here yet is still parsed and validated,
    and readable through `value(NAME)`.
    """

    module_name: str | None
    variable_name: str
    app_module: str | None
    gunicorn_conf: str | None
    pre_start_path: str | None
    workers_per_core: float
    max_workers: int | None
    web_concurrency: int | None
    worker_class: str
    host: str
    port: int
    bind: str | None
    log_level: str
    timeout: int
    graceful_timeout: int
    keep_alive: int
    access_log: str | None
    error_log: str | None
    gunicorn_cmd_args: str | None
    gunicorn_control_socket: str
    metrics_host: str
    metrics_port: int
    prometheus_multiproc_dir: str | None
    metrics_instrument: bool
    metrics_app_name: str
    metrics_buckets: tuple[float, ...]
    metrics_skip_paths: frozenset[str]
    app_dir: str
    default_gunicorn_conf: str
    cgroup_root: str

    # --- derived (computed once by from_environ) ---
    #: what Gunicorn is told to bind from the environment: BIND, else HOST:PORT (upstream's rule)
    effective_bind: str = ""
    #: the variable a mistake in that bind is blamed on
    bind_variable: str = "PORT"
    #: `module:variable` to serve, None when no module was given nor found
    app: str | None = None
    #: the Gunicorn config file upstream's search order picks
    conf_path: str = ""
    #: the prestart script's path (it may not exist)
    prestart_path: str = ""
    #: PROMETHEUS_MULTIPROC_DIR, else this server's default
    multiproc_dir: str = ""
    #: every declared value by name, including settings that have no field above yet
    values: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse and validate every declared setting; raise one ConfigError listing each mistake."""
        values = load(environ)
        declared = {f.name for f in fields(cls) if f.name.upper() in BY_NAME}
        typed = {name: values[name.upper()] for name in declared}
        app_dir = Path(values["APP_DIR"])
        bind = values["BIND"] or f"{values['HOST']}:{values['PORT']}"
        module = values["MODULE_NAME"] or detect_module(app_dir)
        app = values["APP_MODULE"] or (f"{module}:{values['VARIABLE_NAME']}" if module else None)
        return cls(
            **typed,
            effective_bind=bind,
            bind_variable="BIND" if values["BIND"] else "PORT",
            app=app,
            conf_path=values["GUNICORN_CONF"] or find_gunicorn_conf(app_dir, values["DEFAULT_GUNICORN_CONF"]),
            prestart_path=values["PRE_START_PATH"] or str(app_dir / "prestart.sh"),
            multiproc_dir=values["PROMETHEUS_MULTIPROC_DIR"] or default_multiproc_dir(values["METRICS_PORT"]),
            values=values,
        )

    def value(self, name: str) -> Any:
        """The parsed value of the setting `name` (for settings without a typed field)."""
        return self.values[name]

    @property
    def app_port(self) -> int | None:
        """The TCP port of `effective_bind`, None for a Unix socket."""
        return port_of(self.effective_bind)

    @property
    def app_host(self) -> str:
        return host_of(self.effective_bind)


def port_of(bind: str) -> int | None:
    """The port of a Gunicorn bind address (`host:port`, `[v6]:port`), None for `unix:` or `fd://`."""
    if bind.startswith(("unix:", "fd://")) or ":" not in bind:
        return None
    try:
        return int(bind.rpartition(":")[2])
    except ValueError:
        return None


def host_of(bind: str) -> str:
    return bind.rpartition(":")[0].strip("[]")


_cached: tuple[tuple[str | None, ...], Settings] | None = None


def current() -> Settings:
    """The Settings of this process's environment, built once (again only if a variable of ours changed).

    The master builds them before Gunicorn reads its config file, and the bundled config file, the hooks
    and the health check read the same object instead of parsing the environment again.
    """
    global _cached
    key = tuple(os.environ.get(s.name) for s in SETTINGS)
    if _cached is None or _cached[0] != key:
        _cached = (key, Settings.from_environ(os.environ))
    return _cached[1]
