"""Upstream's image test cases (tiangolo/uvicorn-gunicorn*), against real containers of our image.

Each case starts one container and makes all of its assertions on it. Containers that do not care about
the worker count run with WEB_CONCURRENCY=1 to keep the module fast on 2 cores.
"""

from __future__ import annotations

import json

import pytest

from tests.support.containers import APPS, DOCKER_STOP_GRACE, Container

pytestmark = pytest.mark.image

# What upstream's harness counts (`docker top` rows whose command contains "gunicorn"): the master and
# its workers; the metrics processes are named for what they are.
COUNT_GUNICORN = """
import os
def cmd(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").lower()
    except OSError:
        return b""
me = {str(os.getpid()), str(os.getppid())}  # this snippet's own command line names "gunicorn" too
print(sum(1 for p in os.listdir("/proc") if p.isdigit() and p not in me and b"gunicorn" in cmd(p)))
"""

CPUS = "import os; print(len(os.sched_getaffinity(0)))"


def effective_config(container: Container) -> dict:
    prefix = "gunicorn-prometheus: effective configuration "
    for line in container.logs().splitlines():
        if line.strip().startswith(prefix):
            return json.loads(line.strip()[len(prefix) :])
    raise AssertionError(f"no effective configuration line in the logs\n{container.logs()}")


def gunicorn_processes(container: Container) -> int:
    return int(container.py(COUNT_GUNICORN))


def bind_of(config: dict) -> str:
    bind = config["bind"]
    return bind[0] if isinstance(bind, list) else bind


def test_defaults(image, make_container):
    c = make_container(image)
    assert c.wait_http("/").json() == {"Hello": "World"}
    assert c.get("/items/5?q=somequery").json() == {"item_id": 5, "q": "somequery"}

    config = c.config_line()
    cpus = int(c.py(CPUS))
    assert config["workers"] >= 2
    assert config["workers"] == max(cpus, 2)
    assert bind_of(config) == "0.0.0.0:80"
    assert config["host"] == "0.0.0.0"
    assert config["port"] == "80"  # a string, as upstream prints it
    assert config["loglevel"] == "info"
    assert config["timeout"] == 120
    assert config["graceful_timeout"] == 8  # ours: below Docker's 10 s stop grace (upstream: 120)
    assert config["keepalive"] == 5
    assert config["errorlog"] == "-"
    assert config["accesslog"] == "-"
    assert config["workers_per_core"] == 1

    logs = c.wait_log('"GET / HTTP/1.1" 200')
    assert "Checking for script in /app/prestart.sh" in logs
    assert "There is no script /app/prestart.sh" in logs
    assert "Application startup complete." in logs
    assert "Using worker: uvicorn_worker.UvicornWorker" in logs
    assert gunicorn_processes(c) == config["workers"] + 1


def test_env_set_1(image, make_container):
    env = {
        "WORKERS_PER_CORE": "2",
        "PORT": "8000",
        "LOG_LEVEL": "warning",
        "TIMEOUT": "20",
        "GRACEFUL_TIMEOUT": "20",
        "KEEP_ALIVE": "20",
        "ACCESS_LOG": "",
        "ERROR_LOG": "",
    }
    c = make_container(image, env=env, ports=(8000,))
    assert c.wait_http("/", 8000).json() == {"Hello": "World"}
    config = c.config_line()
    cpus = int(c.py(CPUS))
    assert config["workers"] == max(cpus * 2, 2)
    assert config["workers_per_core"] == 2
    assert bind_of(config) == "0.0.0.0:8000"
    assert config["port"] == "8000"
    assert config["loglevel"] == "warning"
    assert (config["timeout"], config["graceful_timeout"], config["keepalive"]) == (20, 20, 20)
    # Gunicorn reads an empty log setting as "off".
    assert config["accesslog"] in ("", None)
    assert config["errorlog"] in ("", None)
    c.get("/", 8000)
    logs = c.logs()
    assert '"GET / HTTP/1.1" 200' not in logs
    assert "Application startup complete." not in logs  # an INFO line
    assert "Checking for script in /app/prestart.sh" in logs  # start.sh's own output stays


def test_env_set_2_one_worker_local_host_cmd_args_and_h11(image, make_container):
    env = {
        "WEB_CONCURRENCY": "1",
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "warning",
        "GUNICORN_CMD_ARGS": "--log-level debug",
        "WORKER_CLASS": "uvicorn_worker.UvicornH11Worker",
    }
    c = make_container(image, env=env, ports=(9464,))
    # HOST=127.0.0.1: the app is reachable only from inside the container.
    body = c.wait_inside(
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:80/', timeout=3).read().decode())"
    )
    assert '"Hello":"World"' in body.replace(" ", "")
    config = c.config_line()
    assert config["workers"] == 1
    assert bind_of(config) == "127.0.0.1:80"
    # upstream prints LOG_LEVEL's value; GUNICORN_CMD_ARGS changes Gunicorn's level (the DEBUG lines below)
    assert config["loglevel"] == "warning"
    assert gunicorn_processes(c) == 2
    logs = c.logs()
    assert "[DEBUG]" in logs
    assert "Using worker: uvicorn_worker.UvicornH11Worker" in logs
    assert c.wait_http("/healthz", 9464).json()["workers_serving"] == 1


def test_bind_beats_host_and_port_and_max_workers(image, make_container):
    env = {"BIND": "0.0.0.0:8080", "HOST": "127.0.0.1", "PORT": "9000", "MAX_WORKERS": "1"}
    c = make_container(image, env=env, ports=(8080,))
    assert c.wait_http("/", 8080).json() == {"Hello": "World"}
    config = c.config_line()
    assert bind_of(config) == "0.0.0.0:8080"
    assert config["workers"] == 1
    assert config["use_max_workers"] == 1
    assert gunicorn_processes(c) == 2


CUSTOM_APP_CASES = {
    "module-and-variable": ({"MODULE_NAME": "custom_app.custom_main", "VARIABLE_NAME": "api"}, False),
    "module-and-variable-custom-prestart": (
        {"MODULE_NAME": "custom_app.custom_main", "VARIABLE_NAME": "api"},
        True,
    ),
    "app-module": ({"APP_MODULE": "custom_app.custom_main:api"}, False),
    "app-module-custom-prestart": ({"APP_MODULE": "custom_app.custom_main:api"}, True),
}


@pytest.mark.parametrize("case", list(CUSTOM_APP_CASES))
def test_custom_app(image, make_container, case):
    env, custom_prestart = CUSTOM_APP_CASES[case]
    env = {**env, "WEB_CONCURRENCY": "1"}
    if custom_prestart:
        env["PRE_START_PATH"] = "/app/custom_prestart.sh"
    c = make_container(image, env=env, files={f"{APPS / 'custom'}/.": "/app/"})
    expected_prestart = "custom" if custom_prestart else "default"
    assert c.wait_http("/").json() == {"message": "custom app", "prestart": expected_prestart}
    logs = c.logs()
    script = "/app/custom_prestart.sh" if custom_prestart else "/app/prestart.sh"
    assert f"Checking for script in {script}" in logs
    assert f"Running script {script}" in logs
    assert f"{expected_prestart} prestart script ran" in logs


def test_package_app_with_its_own_gunicorn_conf(image, make_container):
    # /app/app/main.py is found as app.main; /app/app/gunicorn_conf.py is used (no /app/gunicorn_conf.py).
    c = make_container(
        image,
        files={
            APPS / "package" / "app": "/app/app",
            APPS / "confs" / "app_package.py": "/app/app/gunicorn_conf.py",
        },
    )
    assert c.wait_http("/").json() == {"message": "package app"}
    logs = c.logs()
    assert "gunicorn_conf loaded: app_package" in logs
    assert gunicorn_processes(c) == 2  # that file says workers = 1


def test_app_root_gunicorn_conf_comes_first(image, make_container):
    # /app/gunicorn_conf.py beats /app/app/gunicorn_conf.py. This one is written the documented way
    # (our settings, then overrides), so the metrics port keeps working with a user's config file.
    c = make_container(
        image,
        files={
            APPS / "package" / "app": "/app/app",
            APPS / "confs" / "app_package.py": "/app/app/gunicorn_conf.py",
            APPS / "confs" / "app_root.py": "/app/gunicorn_conf.py",
        },
    )
    assert c.wait_http("/").json() == {"message": "package app"}
    logs = c.logs()
    assert "gunicorn_conf loaded: app_root" in logs
    assert "gunicorn_conf loaded: app_package" not in logs
    # the JSON line is printed by gunicorn_settings(), before the file overrides `workers`; what Gunicorn
    # really uses is the master's effective configuration line
    assert effective_config(c)["workers"] == 1
    assert c.wait_http("/healthz", 9464).json()["status"] == "ok"


def test_explicit_gunicorn_conf_wins(image, make_container):
    c = make_container(
        image,
        env={"GUNICORN_CONF": "/app/custom_gunicorn_conf.py"},
        files={
            APPS / "confs" / "app_root.py": "/app/gunicorn_conf.py",
            APPS / "confs" / "custom.py": "/app/custom_gunicorn_conf.py",
        },
    )
    assert c.wait_http("/").json() == {"Hello": "World"}  # the image's default /app/main.py
    logs = c.logs()
    assert "gunicorn_conf loaded: custom" in logs
    assert "gunicorn_conf loaded: app_root" not in logs
    # that file is upstream-style (nothing of ours imported): the metrics are there all the same
    assert c.wait_http("/healthz", 9464).json()["workers_serving"] == 1


def test_start_reload_serves_the_edited_app(image, make_container):
    c = make_container(
        image,
        env={"PORT": "8000", "LOG_LEVEL": "debug"},
        files={APPS / "reload" / "main.py": "/app/main.py"},
        ports=(8000,),
        cmd=["/start-reload.sh"],
    )
    assert c.wait_http("/", 8000).json() == {"version": 1}
    logs = c.logs()
    assert "Checking for script in /app/prestart.sh" in logs
    assert "Uvicorn running on http://0.0.0.0:8000" in logs
    assert "Will watch for changes" in logs or "Started reloader process" in logs
    c.copy_in(APPS / "reload" / "main_v2.py", "/app/main.py")
    # The reloader notices the change, restarts the server and serves the new code.
    c.wait_until(lambda: c.get("/", 8000, timeout=2).json() == {"version": 2}, "the edited app is served")
    c.stop(timeout=DOCKER_STOP_GRACE)  # exit code 0 below: no SIGKILL at the grace's end
    assert c.exit_code() == 0
