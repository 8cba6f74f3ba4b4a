"""Start-up decisions of /start.sh: module detection, config search, and one-line validation errors."""

import socket

import pytest

from gunicorn_prometheus import launch
from gunicorn_prometheus.settings import ConfigError


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "main.py").write_text("app = object()\n")
    return tmp_path


def env(app_dir, **extra):
    return {"APP_DIR": str(app_dir), "DEFAULT_GUNICORN_CONF": str(app_dir / "bundled.py"), **extra}


def test_module_detection_prefers_package_app(tmp_path):
    assert launch.detect_module(tmp_path) is None
    (tmp_path / "main.py").write_text("")
    assert launch.detect_module(tmp_path) == "main"
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("")
    assert launch.detect_module(tmp_path) == "app.main"


def test_gunicorn_conf_search_order(tmp_path):
    bundled = "/gunicorn_conf.py"
    assert launch.find_gunicorn_conf(tmp_path, bundled) == bundled
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "gunicorn_conf.py").write_text("")
    assert launch.find_gunicorn_conf(tmp_path, bundled) == str(tmp_path / "app" / "gunicorn_conf.py")
    (tmp_path / "gunicorn_conf.py").write_text("")
    assert launch.find_gunicorn_conf(tmp_path, bundled) == str(tmp_path / "gunicorn_conf.py")


def test_resolve_exports(app_dir):
    (app_dir / "bundled.py").write_text("")
    exports = launch.resolve(env(app_dir), probe_ports=False)
    assert exports["APP_MODULE"] == "main:app"
    assert exports["GUNICORN_CONF"] == str(app_dir / "bundled.py")
    assert exports["PRE_START_PATH"] == str(app_dir / "prestart.sh")
    assert exports["WORKER_CLASS"] == "uvicorn_worker.UvicornWorker"
    assert exports["PROMETHEUS_MULTIPROC_DIR"].endswith("gunicorn-prometheus-9464")


def test_app_module_overrides_module_and_variable(app_dir):
    (app_dir / "bundled.py").write_text("")
    exports = launch.resolve(
        env(app_dir, APP_MODULE="main:api", MODULE_NAME="x", VARIABLE_NAME="y"), probe_ports=False
    )
    assert exports["APP_MODULE"] == "main:api"


def error_of(environ, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        launch.resolve(environ, probe_ports=kwargs.pop("probe_ports", False), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_module_that_does_not_import(app_dir):
    message = error_of(env(app_dir, MODULE_NAME="missing.module"))
    assert message.startswith("MODULE_NAME='missing.module' is invalid")


def test_no_app_found(tmp_path):
    assert error_of(env(tmp_path)).startswith("MODULE_NAME is not set and neither")


def test_unreadable_gunicorn_conf(app_dir):
    message = error_of(env(app_dir, GUNICORN_CONF=str(app_dir / "nope.py")))
    assert message.startswith("GUNICORN_CONF=") and "readable Gunicorn configuration file" in message


def test_unknown_worker_class(app_dir):
    (app_dir / "bundled.py").write_text("")
    assert error_of(env(app_dir, WORKER_CLASS="nowhere.Worker")).startswith("WORKER_CLASS='nowhere.Worker'")


def test_metrics_port_equal_to_app_port(app_dir):
    (app_dir / "bundled.py").write_text("")
    message = error_of(env(app_dir, PORT="9000", METRICS_PORT="9000"))
    assert message.startswith("METRICS_PORT=9000 is invalid") and "app's port" in message


def test_taken_port_is_reported_before_start(app_dir):
    (app_dir / "bundled.py").write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = error_of(env(app_dir, HOST="127.0.0.1", PORT=str(port)), probe_ports=True)
    assert message == f"PORT={port} is already in use on 127.0.0.1: choose a free port"


def test_shell_exports_are_quoted():
    assert launch.shell_exports({"A": "x y'z"}) == "export A='x y'\"'\"'z'\n"


def test_app_dir_is_put_on_the_python_path(app_dir):
    (app_dir / "bundled.py").write_text("")
    exports = launch.resolve(env(app_dir, PYTHONPATH="/elsewhere"), probe_ports=False)
    assert exports["PYTHONPATH"] == f"{app_dir}:/elsewhere"
    exports = launch.resolve(env(app_dir, PYTHONPATH=str(app_dir)), probe_ports=False)
    assert "PYTHONPATH" not in exports
