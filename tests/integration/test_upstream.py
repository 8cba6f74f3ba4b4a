"""Upstream's test suite (tiangolo/uvicorn-gunicorn-fastapi), ported to plain processes.

Each case starts the real /start.sh with a real Gunicorn master and real workers, talks HTTP over
loopback, parses the printed JSON config and counts worker processes from the OS.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import psutil
import pytest

from gunicorn_prometheus import conf, cpu, settings
from tests.support.containers import http_get
from tests.support.net import free_port
from tests.support.paths import REPO, VENV_BIN
from tests.support.server import clean_environ, write_app
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


def effective_config(server) -> dict:
    """The master's line of what Gunicorn really uses (after the config file and GUNICORN_CMD_ARGS)."""
    prefix = "gunicorn-prometheus: effective configuration "
    for line in server.logs().splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix) :])
    raise AssertionError("no effective configuration line in the logs:\n" + server.logs())


def gunicorn_processes(server) -> list[psutil.Process]:
    """What upstream's harness counts: the processes whose command line contains "gunicorn"."""
    found = []
    for p in [server.master(), *server.session_processes()]:
        try:
            if "gunicorn" in " ".join(p.cmdline()).lower():
                found.append(p)
        except psutil.Error:
            continue
    return found


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
    assert (config["host"], config["port"], config["workers_per_core"]) == ("0.0.0.0", "80", 1.0)
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
    # upstream prints LOG_LEVEL's value; GUNICORN_CMD_ARGS changes Gunicorn's level, not the printed one
    assert config["loglevel"] == "warning"
    assert effective_config(server)["loglevel"] == "debug"
    assert config["host"] == "127.0.0.1"
    # exactly one worker: two processes with "gunicorn" in their command line, as upstream counts them
    # (the metrics processes, running by now, are named for what they are)
    server.wait_metrics_ready()
    assert len(gunicorn_processes(server)) == 2
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
    assert effective_config(server)["timeout"] == 33
    assert effective_config(server)["config"] == str(target)
    assert server.master().cmdline()[server.master().cmdline().index("-c") + 1] == str(target)


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


BAD_VALUES_BOTH_SCRIPTS = [
    ("WORKERS_PER_CORE", "abc", "WORKERS_PER_CORE='abc' is invalid: expected a number > 0"),
    ("PORT", "70000", "PORT='70000' is invalid: expected an integer from 1 to 65535"),
    ("WEB_CONCURRENCY", "0", "WEB_CONCURRENCY='0' is invalid: expected an integer >= 1"),
    ("MODULE_NAME", "not_there", "MODULE_NAME='not_there' is invalid: no module 'not_there'"),
    ("PRE_START_PATH", '"/app/prestart.sh"', "PRE_START_PATH='\"/app/prestart.sh\"' is invalid"),
    ("GUNICORN_CONF", "/nonexistent/conf.py", "GUNICORN_CONF='/nonexistent/conf.py' is invalid"),
]


@pytest.mark.parametrize(
    ("script", "variable", "value", "expected"),
    [("start.sh", *case) for case in BAD_VALUES_BOTH_SCRIPTS]
    # start-reload.sh runs no Gunicorn, so GUNICORN_CONF does not apply to it
    + [("start-reload.sh", *case) for case in BAD_VALUES_BOTH_SCRIPTS if case[0] != "GUNICORN_CONF"],
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


def test_harness_reads_the_config_through_the_master_command_line(start_server, app_dir):
    """Upstream's harness: `-c <file>` of the first "gunicorn" process, then `python <file>` prints JSON."""
    write_app(app_dir)
    server = start_server(
        app_dir, WEB_CONCURRENCY="1", LOG_LEVEL="warning", GUNICORN_CMD_ARGS="--log-level debug"
    )
    command = server.master().cmdline()
    assert "gunicorn" in " ".join(command)
    conf = command[command.index("-c") + 1]
    assert conf == str(REPO / "gunicorn_conf.py")
    printed = subprocess.run(
        [sys.executable, conf], env=server.env, capture_output=True, text=True, timeout=60, check=True
    )
    config = json.loads(printed.stdout + printed.stderr)  # all of it, as upstream's harness parses it
    assert config == server.config()
    assert (config["port"], config["host"], config["loglevel"]) == (str(server.port), "127.0.0.1", "warning")
    assert isinstance(config["workers"], int) and isinstance(config["workers_per_core"], float)
    assert config["use_max_workers"] is None
    assert effective_config(server)["loglevel"] == "debug"


UPSTREAM_STYLE_CONF = """
    import json
    import os

    workers = 2
    bind = os.environ["TEST_BIND"]
    loglevel = "info"
    keepalive = 7
    print(json.dumps({"workers": workers, "bind": bind, "loglevel": loglevel}), flush=True)


    def post_fork(server, worker):
        print(f"user post_fork {worker.pid}", flush=True)
"""

APP_WITH_OWN_COUNTER = """
    from fastapi import FastAPI
    from prometheus_client import Counter

    app = FastAPI()
    HELLOS = Counter("hellos", "Hellos said.")


    @app.get("/")
    def read_root():
        HELLOS.inc()
        return {"Hello": "World"}
"""


@pytest.mark.parametrize("own_counter", [False, True])
def test_upstream_style_user_conf_keeps_the_metrics(start_server, app_dir, own_counter):
    """A user's gunicorn_conf.py that imports nothing of ours: its settings and hooks, and our metrics."""
    write_app(app_dir, APP_WITH_OWN_COUNTER if own_counter else QUICK_START_APP)
    (app_dir / "gunicorn_conf.py").write_text(textwrap.dedent(UPSTREAM_STYLE_CONF))
    port = free_port()
    server = start_server(app_dir, PORT=None, TEST_BIND=f"127.0.0.1:{port}", wait=None)
    server.port = port
    server.wait_ready()
    server.wait_metrics_ready()
    wait_until(lambda: server.logs().count("user post_fork") == 2, 30, "the user's post_fork in both workers")
    effective = effective_config(server)
    assert (effective["workers"], effective["keepalive"]) == (2, 7)
    assert effective["config"] == str(app_dir / "gunicorn_conf.py")
    for _ in range(3):
        assert server.get("/").json() == {"Hello": "World"}
    line = 'starlette_requests_total{app_name="starlette",method="GET",path="/",status_code="200"}'
    wait_until(lambda: f"{line} 4.0" in server.metrics_get().text, 10, "every request counted")
    if own_counter:
        wait_until(lambda: "hellos_total 4.0" in server.metrics_get().text, 10, "the app's own counter")


QUICK_START_APP = (REPO / "examples" / "app" / "main.py").read_text()

ASGI2_APP = """
    import json


    class App:
        # Upstream's sample app style: the constructor takes the scope, the instance is awaited.
        def __init__(self, scope):
            assert scope["type"] in ("http", "lifespan")
            self.scope = scope

        async def __call__(self, receive, send):
            if self.scope["type"] == "lifespan":
                {lifespan}
                return
            body = json.dumps({{"asgi": 2, "path": self.scope["path"]}}).encode()
            await send({{"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]}})
            await send({{"type": "http.response.body", "body": body}})


    app = App
"""

LIFESPAN = {
    "with_lifespan": """while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        print("asgi2 lifespan startup", flush=True)
                        await send({"type": "lifespan.startup.complete"})
                    elif message["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        break""",
    "without_lifespan": 'raise RuntimeError("no lifespan here")',
}


@pytest.mark.parametrize("lifespan", sorted(LIFESPAN))
def test_asgi2_app_is_served_and_counted(start_server, app_dir, lifespan):
    write_app(app_dir, ASGI2_APP.format(lifespan=LIFESPAN[lifespan]))
    server = start_server(app_dir, WEB_CONCURRENCY="1")
    assert server.get("/items").json() == {"asgi": 2, "path": "/items"}
    server.wait_metrics_ready()
    # a raw ASGI app has no route templates: its paths are grouped as starlette_exporter does
    line = 'starlette_requests_total{app_name="starlette",method="GET",path="__unknown__",status_code="200"}'
    wait_until(lambda: f"{line} 2.0" in server.metrics_get().text, 10, "the readiness probe and the request")
    assert ("asgi2 lifespan startup" in server.logs()) == (lifespan == "with_lifespan")
    assert "Traceback" not in server.logs() or lifespan == "without_lifespan"


# App objects Uvicorn makes an app of when it loads them, which our wrappers hide from it: the worker hook
# must take Uvicorn's steps itself, or every request is a 500.
LOADED_LIKE_UVICORN = {
    # an app factory, found by VARIABLE_NAME: Uvicorn calls it in the worker's running event loop and
    # serves what it returns (a factory may need that loop: a future made there is awaited by a route)
    "factory": """
    import asyncio

    from fastapi import FastAPI


    def create_app():
        app = FastAPI()
        ready = asyncio.get_running_loop().create_future()
        ready.set_result(True)

        @app.get("/items/{item_id}")
        async def read_item(item_id: int):
            assert await ready
            return {"item_id": item_id}

        return app
""",
    # Sentry's SentryAsgiMiddleware style: `__call__` is a slot set per instance, so the type's __call__
    # is a member descriptor and only the instance's says "coroutine function"
    "instance_call": """
    from fastapi import FastAPI

    inner = FastAPI()


    @inner.get("/items/{item_id}")
    def read_item(item_id: int):
        return {"item_id": item_id}


    class Wrapped:
        __slots__ = ("app", "__call__")

        def __init__(self, app):
            self.app = app
            self.__call__ = self._run

        async def _run(self, scope, receive, send):
            await self.app(scope, receive, send)


    create_app = Wrapped(inner)
""",
}


@pytest.mark.parametrize("style", sorted(LOADED_LIKE_UVICORN))
def test_app_objects_are_loaded_as_uvicorn_loads_them(start_server, app_dir, style):
    write_app(app_dir, LOADED_LIKE_UVICORN[style])
    server = start_server(app_dir, WEB_CONCURRENCY="1", VARIABLE_NAME="create_app")
    assert server.get("/items/5").json() == {"item_id": 5}
    server.wait_metrics_ready()
    labels = 'app_name="starlette",method="GET",path="/items/{item_id}",status_code="200"'
    line = "starlette_requests_total{" + labels + "}"
    wait_until(lambda: f"{line} 1.0" in server.metrics_get().text, 10, "the request counted by its route")
    assert ("called as an app factory" in server.logs()) == (style == "factory")
    assert "Traceback" not in server.logs()


USER_POST_WORKER_INIT_CONF = """
    import os


    class UnderApi:
        # What `--root-path /api` does, on a copy of the scope: the router then writes the route into the
        # copy, which ours sees only if it is inside this middleware
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                scope = {**scope, "root_path": "/api", "path": "/api" + scope["path"]}
            await self.app(scope, receive, send)


    def post_worker_init(worker):
        # Plain Gunicorn hands this hook the app in worker.wsgi: its attributes are the app's
        worker.wsgi.state.booted_by = os.getpid()
        worker.wsgi = UnderApi(worker.wsgi)
        print("user post_worker_init", flush=True)
"""

STATE_APP = """
    import os

    from fastapi import FastAPI, Request

    app = FastAPI()


    @app.get("/items/{item_id}")
    def read_item(item_id: int, request: Request):
        return {"state_set_in_this_worker": request.app.state.booted_by == os.getpid()}
"""


def test_user_post_worker_init_finds_the_app_and_wraps_it(start_server, app_dir):
    """A user's post_worker_init reads the app's attributes through worker.wsgi (ours, then theirs, as
    hooks chain) and wraps it in a middleware of theirs that copies the scope: the request still counts
    under its route template, ours being inside theirs."""
    write_app(app_dir, STATE_APP)
    (app_dir / "gunicorn_conf.py").write_text(textwrap.dedent(USER_POST_WORKER_INIT_CONF))
    server = start_server(app_dir, WEB_CONCURRENCY="1")
    assert server.get("/items/5").json() == {"state_set_in_this_worker": True}
    assert "user post_worker_init" in server.logs()
    server.wait_metrics_ready()
    labels = 'app_name="starlette",method="GET",path="/items/{item_id}",status_code="200"'
    line = "starlette_requests_total{" + labels + "}"
    wait_until(lambda: f"{line} 1.0" in server.metrics_get().text, 10, "the request counted by its route")


ASGI3_WEBSOCKET_APP = """
    async def app(scope, receive, send):
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            message = await receive()
            await send({"type": "websocket.send", "text": "echo " + message["text"]})
            await send({"type": "websocket.close"})
            return
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
"""


def test_asgi3_app_without_lifespan_and_websockets_pass_through_uncounted(start_server, app_dir):
    from websockets.sync.client import connect

    write_app(app_dir, ASGI3_WEBSOCKET_APP)
    server = start_server(app_dir, WEB_CONCURRENCY="1")
    assert server.get("/").text == "ok"
    with connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10) as websocket:
        websocket.send("hi")
        assert websocket.recv(timeout=10) == "echo hi"
    server.wait_metrics_ready()
    line = 'starlette_requests_total{app_name="starlette",method="GET",path="__unknown__",status_code="200"}'
    wait_until(lambda: f"{line} 2.0" in server.metrics_get().text, 10, "the HTTP requests counted")
    requests = [
        s for s in server.metrics_get().text.splitlines() if s.startswith("starlette_requests_total{")
    ]
    assert requests == [f"{line} 2.0"]  # the websocket session is counted nowhere


def test_the_bind_checked_is_the_bind_used(start_server, app_dir):
    """GUNICORN_CMD_ARGS' --bind wins: a taken PORT that will not be used does not stop the start."""
    write_app(app_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind_port = free_port()
        server = start_server(
            app_dir,
            WEB_CONCURRENCY="1",
            PORT=str(taken.getsockname()[1]),
            GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{bind_port}",
            wait=None,
        )
        server.port = bind_port
        server.wait_ready()
    assert effective_config(server)["bind"] == [f"127.0.0.1:{bind_port}"]


def test_a_taken_port_from_the_config_file_is_named_there(start_server, app_dir):
    write_app(app_dir)
    (app_dir / "gunicorn_conf.py").write_text(textwrap.dedent(UPSTREAM_STYLE_CONF))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(app_dir, TEST_BIND=f"127.0.0.1:{port}", wait=None)
        logs = server.failed_start_logs()
    errors = [line for line in logs.splitlines() if "configuration error" in line]
    assert errors == [
        f"gunicorn-prometheus: configuration error: bind = '127.0.0.1:{port}' in "
        f"{app_dir / 'gunicorn_conf.py'} is already in use on 127.0.0.1: choose a free port"
    ]


# Every setting with values it must refuse: (variable, value, text the one error line contains).
# "{tmp}" stands for a directory of the test's own.
INVALID = [
    ("MODULE_NAME", "app/main.py", "expected a dotted Python module name"),
    ("MODULE_NAME", "not_there", "no module 'not_there' can be imported"),
    ("VARIABLE_NAME", "my-app", "expected a Python variable name"),
    ("VARIABLE_NAME", "api", "defines no 'api'"),
    ("APP_MODULE", "main:", "expected module:variable"),
    ("APP_MODULE", "main:api", "defines no 'api'"),
    ("GUNICORN_CONF", "/nonexistent/conf.py", "expected a readable Gunicorn configuration file"),
    ("PRE_START_PATH", '"/app/prestart.sh"', "without surrounding quotes"),
    ("WORKERS_PER_CORE", "abc", "expected a number > 0"),
    ("WORKERS_PER_CORE", "-1", "expected a number > 0"),
    ("MAX_WORKERS", "-1", "expected an integer >= 0"),
    ("WEB_CONCURRENCY", "0", "expected an integer >= 1"),
    ("WEB_CONCURRENCY", "two", "expected an integer >= 1"),
    ("WORKER_CLASS", "sync", "SyncWorker serves WSGI apps only"),
    ("WORKER_CLASS", "nowhere.Worker", "it cannot be imported"),
    ("WORKER_CLASS", "not a class", "expected a Gunicorn worker class"),
    ("HOST", " ", "expected a non-empty value"),
    ("PORT", "70000", "expected an integer from 1 to 65535"),
    ("PORT", "eighty", "expected an integer from 1 to 65535"),
    ("BIND", "nowhere", "expected host:port"),
    ("BIND", "0.0.0.0:99999", "expected host:port with a port from 1 to 65535"),
    ("LOG_LEVEL", "verbose", "expected one of debug, info"),
    ("TIMEOUT", "1.5", "expected an integer >= 0"),
    ("GRACEFUL_TIMEOUT", "-1", "expected an integer >= 0"),
    ("KEEP_ALIVE", "x", "expected an integer >= 0"),
    ("ACCESS_LOG", "/nonexistent/access.log", "a file in an existing directory"),
    ("ERROR_LOG", "/nonexistent/error.log", "a file in an existing directory"),
    ("GUNICORN_CMD_ARGS", "--no-such-option", "unrecognized arguments: --no-such-option"),
    ("GUNICORN_CONTROL_SOCKET", "gunicorn.ctl", "expected an absolute path"),
    ("GUNICORN_CONTROL_SOCKET", "{tmp}/file/gunicorn.ctl", "is not a writable directory"),
    ("METRICS_HOST", " ", "expected a non-empty value"),
    ("METRICS_PORT", "0", "expected an integer from 1 to 65535"),
    ("PROMETHEUS_MULTIPROC_DIR", "/proc/metrics", "not under /proc"),
    ("PROMETHEUS_MULTIPROC_DIR", "metrics", "expected an absolute directory path"),
    ("PROMETHEUS_MULTIPROC_DIR", "{tmp}/file", "not a directory"),
    ("METRICS_WEB_CONFIG", "/nonexistent/web.yml", "expected a Prometheus web config file"),
    ("METRICS_WEB_CONFIG", "{tmp}", "expected a Prometheus web config file"),
    ("METRICS_BEARER_TOKEN_FILE", "/nonexistent/token", "expected a file holding the bearer token"),
    ("METRICS_INSTRUMENT", "maybe", "expected true or false"),
    ("METRICS_APP_NAME", " ", "expected a non-empty value"),
    ("METRICS_BUCKETS", "1,0.5", "expected increasing numbers"),
    ("METRICS_FLUSH_INTERVAL", "-1", "expected a number >= 0"),
    ("METRICS_SATURATION", "sometimes", "expected true or false"),
    ("METRICS_SKIP_PATHS", "health", "expected URL paths starting with /"),
    ("METRICS_SKIP_PATHS", "/static/(.*", "is not a valid regular expression"),
    ("APP_DIR", "relative/app", "expected an absolute path"),
    ("APP_DIR", "/nonexistent/app", "expected the directory of your app"),
    ("DEFAULT_GUNICORN_CONF", "/nonexistent/gunicorn_conf.py", "readable Gunicorn configuration file"),
    ("CGROUP_ROOT", "sys/fs/cgroup", "expected an absolute path"),
]


def test_every_setting_has_invalid_values_in_the_table():
    covered = {name for name, _, _ in INVALID}
    assert set(settings.BY_NAME) <= covered, sorted(set(settings.BY_NAME) - covered)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [case for case in INVALID if case[0] in settings.BY_NAME],
    ids=lambda v: str(v)[:30],
)
def test_invalid_value_is_one_line_naming_it_and_a_nonzero_exit(tmp_path, variable, value, expected):
    app_dir = tmp_path / "app"
    write_app(app_dir)
    (tmp_path / "file").write_text("")
    value = value.replace("{tmp}", str(tmp_path))
    env = clean_environ()
    env.update(
        {
            "APP_DIR": str(app_dir),
            "DEFAULT_GUNICORN_CONF": str(REPO / "gunicorn_conf.py"),
            "HOST": "127.0.0.1",
            "PORT": str(free_port()),
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(free_port()),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "multiproc"),
            variable: value,
        }
    )
    result = subprocess.run(
        [str(REPO / "image" / "start.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and "Booting worker" not in output, output
    errors = [line for line in output.splitlines() if "configuration error" in line]
    assert len(errors) == 1, output
    assert errors[0].startswith(f"gunicorn-prometheus: configuration error: {variable}"), output
    assert repr(value) in errors[0] or value in errors[0], output
    assert expected in errors[0], output


def test_a_plain_gunicorn_command_says_it_runs_without_metrics(app_dir, tmp_path):
    """A user's own CMD with plain `gunicorn -c /gunicorn_conf.py` serves the app but none of our hooks run:
    the config file says so in one line, instead of the metrics silently not being there."""
    write_app(app_dir)
    port = free_port()
    env = clean_environ()
    env.update(HOST="127.0.0.1", PORT=str(port), WEB_CONCURRENCY="1", LOG_LEVEL="warning")
    env.update(PROMETHEUS_MULTIPROC_DIR=str(tmp_path), PYTHONPATH=str(app_dir))
    log = tmp_path / "plain.log"
    with log.open("wb") as out:
        command = [str(VENV_BIN / "gunicorn"), "-k", "uvicorn_worker.UvicornWorker"]
        command += ["-c", str(REPO / "gunicorn_conf.py"), "main:app"]
        proc = subprocess.Popen(
            command, cwd=app_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(lambda: _answers(port), 30, "the app under plain gunicorn")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    said = [line for line in log.read_text().splitlines() if line.startswith("gunicorn-prometheus: warning")]
    assert said == [conf.PLAIN_GUNICORN_WARNING]


def _answers(port: int) -> bool:
    try:
        return http_get(port, timeout=2).status == 200
    except (OSError, http.client.HTTPException):
        return False
