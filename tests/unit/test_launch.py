"""Start-up decisions (module detection, config search) and the checks of what will really be used."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gunicorn_prometheus import launch, settings
from gunicorn_prometheus.settings import ConfigError, Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def app_dir(tmp_path, monkeypatch):
    (tmp_path / "main.py").write_text("app = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("main", "starry", "pkg", "pkg.mod"):
        sys.modules.pop(name, None)
    return tmp_path


def env(app_dir, **extra):
    return {"APP_DIR": str(app_dir), "DEFAULT_GUNICORN_CONF": str(app_dir / "bundled.py"), **extra}


def test_module_detection_prefers_package_app(tmp_path):
    assert settings.detect_module(tmp_path) is None
    (tmp_path / "main.py").write_text("")
    assert settings.detect_module(tmp_path) == "main"
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("")
    assert settings.detect_module(tmp_path) == "app.main"


def test_gunicorn_conf_search_order(tmp_path):
    bundled = "/gunicorn_conf.py"
    assert settings.find_gunicorn_conf(tmp_path, bundled) == bundled
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "gunicorn_conf.py").write_text("")
    assert settings.find_gunicorn_conf(tmp_path, bundled) == str(tmp_path / "app" / "gunicorn_conf.py")
    (tmp_path / "gunicorn_conf.py").write_text("")
    assert settings.find_gunicorn_conf(tmp_path, bundled) == str(tmp_path / "gunicorn_conf.py")


def test_derived_values(app_dir):
    values = Settings.from_environ(env(app_dir))
    assert values.app == "main:app"
    assert values.conf_path == str(app_dir / "bundled.py")
    assert values.prestart_path == str(app_dir / "prestart.sh")
    assert values.multiproc_dir.endswith("gunicorn-prometheus-9464")
    assert (values.effective_bind, values.bind_variable) == ("0.0.0.0:80", "PORT")
    assert (values.app_host, values.app_port) == ("0.0.0.0", 80)
    values = Settings.from_environ(env(app_dir, BIND="127.0.0.1:8080", METRICS_PORT="9000"))
    assert (values.effective_bind, values.bind_variable, values.app_port) == ("127.0.0.1:8080", "BIND", 8080)
    assert values.multiproc_dir.endswith("gunicorn-prometheus-9000")


def test_app_module_overrides_module_and_variable(app_dir):
    values = Settings.from_environ(env(app_dir, APP_MODULE="main:api", MODULE_NAME="x", VARIABLE_NAME="y"))
    assert values.app == "main:api"


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_module_that_does_not_import(app_dir):
    environ = env(app_dir, MODULE_NAME="missing.module")
    with pytest.raises(ConfigError) as info:
        launch.check_app("missing.module:app", Settings.from_environ(environ), environ)
    assert one_line(info).startswith("MODULE_NAME='missing.module' is invalid: no module")


def test_no_app_found(tmp_path):
    environ = env(tmp_path)
    values = Settings.from_environ(environ)
    assert values.app is None
    with pytest.raises(ConfigError) as info:
        launch.check_app(values.app, values, environ)
    assert one_line(info).startswith("MODULE_NAME is not set and neither")


def test_missing_variable_is_found_without_running_the_app(app_dir):
    (app_dir / "main.py").write_text("raise SystemExit('the app module must not run')\napp = 1\n")
    environ = env(app_dir, VARIABLE_NAME="api")
    with pytest.raises(ConfigError) as info:
        launch.check_app("main:api", Settings.from_environ(environ), environ)
    assert one_line(info).startswith("VARIABLE_NAME='api' is invalid: module 'main'")
    launch.check_app("main:app", Settings.from_environ(env(app_dir)), env(app_dir))  # parsed, never run


def test_app_module_is_blamed_when_it_named_the_app(app_dir):
    environ = env(app_dir, APP_MODULE="main:api")
    with pytest.raises(ConfigError) as info:
        launch.check_app("main:api", Settings.from_environ(environ), environ)
    assert one_line(info).startswith("APP_MODULE='main:api' is invalid")


@pytest.mark.parametrize(
    "source",
    [
        "from os.path import *\n",
        "def __getattr__(name):\n    return 1\n",
        "import api\n",
        "from x import y as api\n",
        "api: object = 1\n",
        "for api in range(2):\n    pass\n",
        "async def api(scope, receive, send):\n    pass\n",
        "class api:\n    pass\n",
    ],
)
def test_variable_check_gives_dynamic_modules_the_benefit_of_the_doubt(app_dir, source):
    (app_dir / "starry.py").write_text(source)
    launch.check_app("starry:api", Settings.from_environ(env(app_dir)), env(app_dir))


@pytest.mark.parametrize(
    ("worker_class", "expected"),
    [
        ("sync", "SyncWorker serves WSGI apps only"),
        ("gthread", "ThreadWorker serves WSGI apps only"),
        ("nowhere.Worker", "it cannot be imported"),
        ("collections.OrderedDict", "it is not a Gunicorn worker"),
    ],
)
def test_worker_class_must_be_an_asgi_gunicorn_worker(worker_class, expected):
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("worker_class", worker_class)
    with pytest.raises(ConfigError) as info:
        launch.check_worker_class(lambda: cfg.worker_class, f"WORKER_CLASS={worker_class!r}")
    message = one_line(info)
    assert message.startswith(f"WORKER_CLASS={worker_class!r} is invalid: expected an ASGI Gunicorn worker")
    assert expected in message


@pytest.mark.parametrize(
    "worker_class", ["uvicorn_worker.UvicornWorker", "uvicorn_worker.UvicornH11Worker", "asgi"]
)
def test_asgi_worker_classes_pass(worker_class):
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("worker_class", worker_class)
    assert launch.check_worker_class(lambda: cfg.worker_class, "WORKER_CLASS")


def sources(environ, conf_values=None, cmd_args=None, conf_path="/app/gunicorn_conf.py"):
    values = Settings.from_environ(environ)
    return launch.Sources(values, conf_path, conf_values or {}, cmd_args or {}, environ)


def test_port_equal_to_metrics_port_names_port():
    environ = {"PORT": "9464"}
    with pytest.raises(ConfigError) as info:
        launch.check_binds(["0.0.0.0:9464"], sources(environ), probe=False)
    message = one_line(info)
    assert message.startswith("PORT=9464 is invalid: port 9464 is the metrics port (METRICS_PORT=9464)")


def test_metrics_port_equal_to_app_port_names_metrics_port():
    environ = {"METRICS_PORT": "80"}
    with pytest.raises(ConfigError) as info:
        launch.check_binds(["0.0.0.0:80"], sources(environ, {"bind": ["0.0.0.0:80"]}), probe=False)
    assert one_line(info).startswith("METRICS_PORT=80 is invalid: it is also the app's port")


def test_taken_port_is_reported_before_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = {"HOST": "127.0.0.1", "PORT": str(port), "METRICS_PORT": "1"}
        with pytest.raises(ConfigError) as info:
            launch.check_binds([f"127.0.0.1:{port}"], sources(environ, {"bind": [f"127.0.0.1:{port}"]}))
    assert one_line(info) == f"PORT={port} is already in use on 127.0.0.1: choose a free port"


def test_bind_error_names_where_the_bind_came_from():
    environ = {"GUNICORN_CMD_ARGS": "--bind 0.0.0.0:8080"}
    assert sources(environ, cmd_args={"bind": ["0.0.0.0:8080"]}).bind("0.0.0.0:8080") == (
        "GUNICORN_CMD_ARGS='--bind 0.0.0.0:8080'"
    )
    assert sources({}, {"bind": "0.0.0.0:8080"}).bind("0.0.0.0:8080") == (
        "bind = '0.0.0.0:8080' in /app/gunicorn_conf.py"
    )
    assert sources({"BIND": "127.0.0.1:81"}, {"bind": ["127.0.0.1:81"]}).bind("x") == "BIND='127.0.0.1:81'"
    assert sources({"PORT": "81"}, {"bind": ["0.0.0.0:81"]}).bind("x") == "PORT=81"


def test_control_socket_in_an_unwritable_place(tmp_path):
    existing_file = tmp_path / "file"
    existing_file.write_text("")
    for path, expected in [(existing_file, "is not a socket"), (existing_file / "sock", "not a writable")]:
        cfg = SimpleNamespace(control_socket_disable=False, control_socket=str(path))
        with pytest.raises(ConfigError) as info:
            launch.check_control_socket(cfg, {"GUNICORN_CONTROL_SOCKET": str(path)})
        assert one_line(info).startswith(f"GUNICORN_CONTROL_SOCKET={str(path)!r} is invalid")
        assert expected in str(info.value)
    ok = SimpleNamespace(control_socket_disable=False, control_socket=str(tmp_path / "new" / "g.ctl"))
    launch.check_control_socket(ok, {})


def test_start_scripts_defaults_are_the_declared_ones():
    """The shell repeats a few defaults (no interpreter before the master): they must be the declared ones."""
    for script in ("start.sh", "start-reload.sh"):
        text = (REPO / "image" / script).read_text()
        found = re.findall(r"\$\{([A-Z_]+):-([^}$]+)\}", text)
        assert found, script
        for name, default in found:
            if name in settings.BY_NAME:
                assert settings.BY_NAME[name].default == default, (script, name, default)
