"""Upstream's test suite (tiangolo/uvicorn-gunicorn-fastapi), ported to plain processes.

Each case starts the real /start.sh with a real Gunicorn master and real workers, talks HTTP over
loopback, parses the printed JSON config and counts worker processes from the OS.
"""

from __future__ import annotations

import socket
import textwrap

import pytest

from gunicorn_prometheus import cpu
from tests.support.net import free_port
from tests.support.paths import REPO
from tests.support.server import write_app
from tests.support.waiting import wait_until

CPUS = cpu.detect().count


def expected_workers(per_core: float = 1.0) -> int:
    return max(int(CPUS * per_core), 2)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def check_common_logs(logs: str, worker_class: str = "uvicorn_worker.UvicornWorker") -> None:
    assert "Checking for script in" in logs
    assert "Application startup complete." in logs
    assert f"Using worker: {worker_class}" in logs


def test_defaults(start_server, app_dir):
    """The real defaults: 0.0.0.0:80, metrics on 9464, timeouts 120, keep-alive 5, logs on the console."""
    if not (port_free(80) and port_free(9464)):
        pytest.fail("ports 80 and 9464 must be free for the defaults test (stop what listens there)")
    write_app(app_dir, path="app/main.py")
    (app_dir / "prestart.sh").write_text('echo "prestart ran"\n')
    server = start_server(
        app_dir,
        HOST=None,
        PORT=None,
        METRICS_HOST=None,
        METRICS_PORT=None,
        PROMETHEUS_MULTIPROC_DIR=None,
        wait=None,
    )
    server.port, server.metrics_port = 80, 9464
    server.wait_ready()
    assert server.get("/").json() == {"Hello": "World"}
    config = server.config()
    assert config["workers"] == expected_workers() >= 2
    assert config["bind"] == "0.0.0.0:80"
    assert (config["timeout"], config["keepalive"], config["loglevel"]) == (120, 5, "info")
    assert config["graceful_timeout"] == 8
    assert (config["errorlog"], config["accesslog"]) == ("-", "-")
    assert (config["host"], config["port"], config["workers_per_core"]) == ("0.0.0.0", 80, 1.0)
    assert config["use_max_workers"] is None
    assert config["cpu_count"] == CPUS and config["cpu_source"]
    assert config["multiproc_dir"] == "/dev/shm/gunicorn-prometheus-9464"
    wait_until(lambda: '"GET / HTTP/1.1" 200' in server.logs(), 10, "the access log line")
    logs = server.logs()
    check_common_logs(logs)
    assert f"Running script {app_dir}/prestart.sh" in logs and "prestart ran" in logs
    assert len(server.workers()) == config["workers"]
    assert server.metrics_get("/healthz").status_code == 200


def test_restart_starts_clean(start_server, app_dir):
    """Upstream checks everything again after a container restart: here, the same directories twice."""
    write_app(app_dir)
    first = start_server(app_dir, WEB_CONCURRENCY="1")
    for _ in range(3):
        first.get("/")
    port, metrics_port = first.port, first.metrics_port
    assert first.stop() == 0
    second = start_server(app_dir, WEB_CONCURRENCY="1", PORT=str(port), METRICS_PORT=str(metrics_port))
    assert second.get("/").json() == {"Hello": "World"}
    second.wait_metrics_ready()
    line = 'starlette_requests_total{app_name="starlette",method="GET",path="/",status_code="200"}'
    # the readiness probe and one request: the first run's four are gone with the restart
    wait_until(lambda: f"{line} 2.0" in second.metrics_get().text, 10, "two requests counted, not six")
    check_common_logs(second.logs())


def test_env_set_1(start_server, app_dir):
    write_app(app_dir, path="app/main.py")
    port = free_port()
    server = start_server(
        app_dir,
        WORKERS_PER_CORE="2",
        PORT=str(port),
        LOG_LEVEL="warning",
        TIMEOUT="20",
        GRACEFUL_TIMEOUT="20",
        KEEP_ALIVE="20",
        ACCESS_LOG="",
        ERROR_LOG="",
    )
    assert server.get("/items/3?q=a").json() == {"item_id": 3, "q": "a"}
    config = server.config()
    assert config["workers"] == expected_workers(2)
    assert config["bind"] == f"127.0.0.1:{port}"
    assert (config["loglevel"], config["timeout"], config["graceful_timeout"], config["keepalive"]) == (
        "warning",
        20,
        20,
        20,
    )
    assert config["errorlog"] is None and config["accesslog"] is None
    wait_until(lambda: len(server.workers()) == config["workers"], 10, "all workers")
    logs = server.logs()
    assert "GET /items/3" not in logs
    assert "[INFO]" not in logs and "Application startup complete." not in logs


def test_env_set_2(start_server, app_dir):
    write_app(app_dir)
    server = start_server(
        app_dir,
        WEB_CONCURRENCY="1",
        HOST="127.0.0.1",
        LOG_LEVEL="warning",
        GUNICORN_CMD_ARGS="--log-level debug",
        WORKER_CLASS="uvicorn.workers.UvicornH11Worker",
    )
    assert server.get("/").json() == {"Hello": "World"}
    config = server.config()
    assert config["workers"] == 1
    assert config["loglevel"] == "debug"  # GUNICORN_CMD_ARGS beats LOG_LEVEL
    assert config["host"] == "127.0.0.1"
    # exactly one worker: two Gunicorn processes, as upstream counts them
    gunicorn_processes = [server.master(), *server.workers()]
    assert len(gunicorn_processes) == 2
    logs = server.logs()
    assert "[DEBUG]" in logs
    check_common_logs(logs, "uvicorn.workers.UvicornH11Worker")


def test_bind_beats_host_and_port_and_max_workers(start_server, app_dir):
    write_app(app_dir)
    bind_port = free_port()
    server = start_server(app_dir, BIND=f"127.0.0.1:{bind_port}", MAX_WORKERS="1", wait=None)
    server.port = bind_port
    server.wait_ready()
    assert server.config()["bind"] == f"127.0.0.1:{bind_port}"
    assert server.config()["workers"] == 1
    assert len(server.workers()) == 1


CUSTOM_APP = """
    from fastapi import FastAPI

    custom_var = FastAPI()


    @custom_var.get("/")
    def read_root():
        return {"message": "custom app"}
"""


@pytest.mark.parametrize("prestart", [False, True])
@pytest.mark.parametrize("style", ["module_and_variable", "app_module"])
def test_custom_app(start_server, app_dir, style, prestart):
    write_app(app_dir, CUSTOM_APP, path="custom_app/custom_main.py")
    settings = (
        {"MODULE_NAME": "custom_app.custom_main", "VARIABLE_NAME": "custom_var"}
        if style == "module_and_variable"
        else {"APP_MODULE": "custom_app.custom_main:custom_var"}
    )
    if prestart:
        script = app_dir / "custom_app" / "prestart.sh"
        script.write_text('echo "custom prestart"\n')
        settings["PRE_START_PATH"] = str(script)
    server = start_server(app_dir, WEB_CONCURRENCY="1", **settings)
    assert server.get("/").json() == {"message": "custom app"}
    logs = server.logs()
    if prestart:
        assert f"Running script {script}" in logs and "custom prestart" in logs
    else:
        assert f"There is no script {app_dir}/prestart.sh" in logs


@pytest.mark.parametrize("location", ["app_dir", "package", "explicit"])
def test_gunicorn_conf_locations(start_server, app_dir, tmp_path, location):
    write_app(app_dir, path="app/main.py")
    conf = textwrap.dedent(
        f"""
        print("custom gunicorn conf: {location}", flush=True)
        from gunicorn_prometheus.conf import gunicorn_settings
        globals().update(gunicorn_settings())
        timeout = 33
        """
    )
    target = {
        "app_dir": app_dir / "gunicorn_conf.py",
        "package": app_dir / "app" / "gunicorn_conf.py",
        "explicit": tmp_path / "elsewhere.py",
    }[location]
    target.write_text(conf)
    extra = {"GUNICORN_CONF": str(target)} if location == "explicit" else {}
    server = start_server(app_dir, WEB_CONCURRENCY="1", **extra)
    assert server.get("/").json() == {"Hello": "World"}
    assert f"custom gunicorn conf: {location}" in server.logs()
    assert server.config()["timeout"] == 33


def test_main_py_app(start_server, app_dir):
    write_app(app_dir, path="main.py")
    server = start_server(app_dir, WEB_CONCURRENCY="1")
    assert server.get("/items/7").json() == {"item_id": 7, "q": None}


def test_prestart_is_sourced(start_server, app_dir):
    """Exported variables reach the app; that needs `source`, not a subshell."""
    write_app(
        app_dir,
        """
        import os
        from fastapi import FastAPI

        app = FastAPI()


        @app.get("/")
        def read_root():
            return {"from_prestart": os.environ.get("FROM_PRESTART")}
    """,
    )
    (app_dir / "prestart.sh").write_text("export FROM_PRESTART=yes\n")
    server = start_server(app_dir, WEB_CONCURRENCY="1")
    assert server.get("/").json() == {"from_prestart": "yes"}


def test_failing_prestart_stops_the_start(start_server, app_dir):
    write_app(app_dir)
    (app_dir / "prestart.sh").write_text("echo before\nfalse\necho after\n")
    server = start_server(app_dir, wait=None)
    logs = server.failed_start_logs()
    assert "before" in logs and "after" not in logs and "Starting gunicorn" not in logs


def test_reload(start_server, app_dir):
    main = write_app(app_dir, path="app/main.py")
    server = start_server(app_dir, script="start-reload.sh")
    assert server.get("/").json() == {"Hello": "World"}
    main.write_text(main.read_text().replace('{"Hello": "World"}', '{"Hello": "Reloaded"}'))

    def reloaded():
        try:
            return server.get("/").json() == {"Hello": "Reloaded"}
        except Exception:
            return False

    wait_until(reloaded, 30, "the edited app to be served")
    logs = server.logs()
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in logs
    assert "Application startup complete." in logs
    assert "Starting gunicorn" not in logs and "Booting worker" not in logs


def test_reload_honours_log_level(start_server, app_dir):
    write_app(app_dir)
    server = start_server(app_dir, script="start-reload.sh", LOG_LEVEL="warning")
    assert server.get("/").json() == {"Hello": "World"}
    assert "INFO:" not in server.logs()


BAD_VALUES = [
    ("WORKERS_PER_CORE", "abc", "WORKERS_PER_CORE='abc' is invalid: expected a number > 0"),
    ("PORT", "70000", "PORT='70000' is invalid: expected an integer from 1 to 65535"),
    ("WEB_CONCURRENCY", "0", "WEB_CONCURRENCY='0' is invalid: expected an integer >= 1"),
    ("MODULE_NAME", "not_there", "MODULE_NAME='not_there' is invalid: no module 'not_there'"),
    ("PRE_START_PATH", '"/app/prestart.sh"', "PRE_START_PATH='\"/app/prestart.sh\"' is invalid"),
    ("GUNICORN_CONF", "/nonexistent/conf.py", "GUNICORN_CONF='/nonexistent/conf.py' is invalid"),
]


@pytest.mark.parametrize(
    ("script", "variable", "value", "expected"),
    [("start.sh", *case) for case in BAD_VALUES]
    # start-reload.sh runs no Gunicorn, so GUNICORN_CONF does not apply to it
    + [("start-reload.sh", *case) for case in BAD_VALUES if case[0] != "GUNICORN_CONF"],
)
def test_bad_configuration_is_one_line_and_nonzero(start_server, app_dir, variable, value, expected, script):
    write_app(app_dir)
    server = start_server(app_dir, script=script, wait=None, **{variable: value})
    logs = server.failed_start_logs()
    errors = [line for line in logs.splitlines() if "configuration error" in line]
    assert len(errors) == 1, logs
    assert errors[0] == f"gunicorn-prometheus: configuration error: {expected}" or expected in errors[0]


def test_start_sh_is_what_the_image_runs():
    dockerfile = (REPO / "image" / "Dockerfile").read_text()
    assert "start.sh" in dockerfile and "start-reload.sh" in dockerfile


def test_worker_count_follows_the_cgroup_quota(start_server, app_dir, tmp_path):
    """A fake cgroup v2 tree allowing half a CPU: 1 usable CPU, times WORKERS_PER_CORE=3 gives 3 workers."""
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "cgroup.controllers").write_text("cpu memory\n")
    (cgroup / "cpu.max").write_text("50000 100000\n")
    write_app(app_dir)
    server = start_server(app_dir, CGROUP_ROOT=str(cgroup), WORKERS_PER_CORE="3")
    config = server.config()
    assert (config["cpu_count"], config["cpu_source"]) == (1, "cgroup2 cpu.max (0.5 CPUs)")
    assert config["workers"] == 3
    wait_until(lambda: len(server.workers()) == 3, 30, "every worker")
