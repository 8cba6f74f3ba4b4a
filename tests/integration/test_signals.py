"""Stop signals sent to the master alone, as `docker stop` and `docker run` without -t deliver them.

SIGTERM is graceful (running requests finish within GRACEFUL_TIMEOUT, those that would not are cut and
counted); SIGINT and SIGQUIT are Gunicorn's quick shutdown (nothing waits for GRACEFUL_TIMEOUT); a
SIGKILLed master takes its workers with it. Durations are bounded generously: each test tells a quick
stop from one that waited for GRACEFUL_TIMEOUT (set far longer), never measures speed.
"""

from __future__ import annotations

import signal
import threading

import httpx
import psutil
import pytest

from tests.support import client
from tests.support.server import write_app
from tests.support.waiting import wait_until

SLOW_APP = """
    import asyncio

    from fastapi import FastAPI

    app = FastAPI()


    @app.get("/")
    def read_root():
        return {"Hello": "World"}


    @app.get("/slow")
    async def slow(seconds: float):
        await asyncio.sleep(seconds)
        return {"slept": seconds}
"""


def request_in_background(server, path: str) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["response"] = client.get(server.url + path, timeout=120)
        except httpx.HTTPError as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def wait_running(server, count: int = 1) -> None:
    """Until the app really has `count` requests running (the in-progress gauge says so)."""

    def running() -> bool:
        for line in server.metrics_get().text.splitlines():
            if line.startswith("starlette_requests_in_progress{") and line.endswith(f" {count}.0"):
                return True
        return False

    wait_until(running, 30, f"{count} request(s) running")


def everything_gone(server) -> bool:
    return server.proc.poll() is not None and not server.session_processes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_quick_shutdown_does_not_wait_for_graceful_timeout(start_server, app_dir, sig):
    write_app(app_dir, SLOW_APP)
    server = start_server(app_dir, WEB_CONCURRENCY="2", GRACEFUL_TIMEOUT="60", METRICS_FLUSH_INTERVAL="0")
    server.wait_metrics_ready()
    thread, outcome = request_in_background(server, "/slow?seconds=100")
    wait_running(server)
    server.proc.send_signal(sig)  # the master alone
    wait_until(lambda: everything_gone(server), 15, "every process to end (a graceful stop waits 60 s)")
    assert server.proc.returncode == 0
    logs = server.logs()
    assert "SIGKILL" not in logs and "Traceback" not in logs, logs
    assert "Error while closing socket" not in logs, logs
    thread.join(10)
    assert "error" in outcome or outcome["response"].status_code == 500  # the quick stop cut it
    cut_lines = [line for line in logs.splitlines() if "were cut" in line]
    assert len(cut_lines) == 1 and "1 request(s) still running were cut by a quick shutdown" in cut_lines[0]


@pytest.mark.parametrize("first", ["worker", "master"])
def test_ctrl_c_on_a_terminal_stops_cleanly_whichever_signal_comes_first(start_server, app_dir, first):
    """`docker run -t` + Ctrl-C: SIGINT reaches the master and the worker.

    The worker then hears of one stop twice, its own SIGINT and the master's SIGQUIT, in an order no one
    controls; neither may count as a second Ctrl-C, which makes Uvicorn force the exit (the app's lifespan
    shutdown skipped, its cancellation logged as a traceback), nor stretch the quick stop to the graceful
    one. Both orders are made here, not left to a race: the first signal is sent, the test waits until
    the worker is stopping (a running request holds it there for the quick stop's grace), then the
    second is sent. One worker: the kernel, not the test, decides which worker accepts a request.
    """
    write_app(app_dir, SLOW_APP)
    server = start_server(app_dir, WEB_CONCURRENCY="1", GRACEFUL_TIMEOUT="60")
    server.wait_metrics_ready()
    (worker,) = server.workers()
    thread, outcome = request_in_background(server, "/slow?seconds=100")
    wait_running(server)
    (server.proc if first == "master" else worker).send_signal(signal.SIGINT)  # the master sends SIGQUIT
    # Logged once Uvicorn waits for the running request, with the grace it read when it began to stop.
    wait_until(lambda: "Waiting for connections to close" in server.logs(), 15, "the worker stopping")
    (worker if first == "master" else server.proc).send_signal(signal.SIGINT)
    wait_until(lambda: everything_gone(server), 15, "every process to end (a graceful stop waits 60 s)")
    assert server.proc.returncode == 0
    logs = server.logs()
    assert "SIGKILL" not in logs and "Traceback" not in logs, logs
    assert "Application shutdown complete" in logs, logs  # the app's lifespan shutdown ran
    assert "1 request(s) still running were cut by a quick shutdown" in logs, logs
    thread.join(10)
    assert "error" in outcome or outcome["response"].status_code == 500


def test_sigterm_lets_running_requests_finish(start_server, app_dir):
    write_app(app_dir, SLOW_APP)
    server = start_server(app_dir, WEB_CONCURRENCY="1", GRACEFUL_TIMEOUT="30", METRICS_FLUSH_INTERVAL="0")
    server.wait_metrics_ready()
    thread, outcome = request_in_background(server, "/slow?seconds=2")
    wait_running(server)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(60)
    assert outcome["response"].json() == {"slept": 2.0}
    wait_until(lambda: everything_gone(server), 30, "every process to end")
    logs = server.logs()
    assert server.proc.returncode == 0
    assert "SIGKILL" not in logs and "cut" not in logs and "Error while closing socket" not in logs, logs


def test_sigterm_cuts_what_outlives_graceful_timeout_and_says_how_many(start_server, app_dir):
    write_app(app_dir, SLOW_APP)
    server = start_server(app_dir, WEB_CONCURRENCY="1", GRACEFUL_TIMEOUT="3", METRICS_FLUSH_INTERVAL="0")
    server.wait_metrics_ready()
    started = [request_in_background(server, "/slow?seconds=100") for _ in range(2)]
    wait_running(server, 2)
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: everything_gone(server), 30, "every process to end")
    logs = server.logs()
    assert server.proc.returncode == 0
    assert "SIGKILL" not in logs, logs
    cut_lines = [line for line in logs.splitlines() if "were cut" in line]
    assert len(cut_lines) == 1, logs
    assert "2 request(s) still running were cut when GRACEFUL_TIMEOUT (3 s) ended" in cut_lines[0]
    for thread, outcome in started:
        thread.join(10)
        assert "error" in outcome or outcome["response"].status_code >= 500


def test_workers_die_with_a_sigkilled_master_and_a_restart_gets_the_ports(start_server, app_dir):
    write_app(app_dir, SLOW_APP)
    server = start_server(app_dir, WEB_CONCURRENCY="2")
    wait_until(lambda: len(server.workers()) == 2, 30, "both workers")
    workers = server.workers()
    server.proc.kill()
    server.proc.wait()
    gone = lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)  # noqa: E731
    wait_until(gone, 10, "the workers of the SIGKILLed master to end")
    wait_until(lambda: not server.session_processes(), 10, "the metrics processes to end")
    again = start_server(
        app_dir, PORT=str(server.port), METRICS_PORT=str(server.metrics_port), WEB_CONCURRENCY="1"
    )
    assert again.get("/").json() == {"Hello": "World"}
    again.wait_metrics_ready()


def test_reload_keeps_serving(start_server, app_dir):
    """SIGHUP re-reads the config and replaces the workers; the hooks stay installed (chained once)."""
    write_app(app_dir, SLOW_APP)
    server = start_server(app_dir, WEB_CONCURRENCY="1")
    server.wait_metrics_ready()
    assert "gunicorn_requests_cut_on_stop_total 0.0" in server.metrics_get().text  # there from the start
    first = server.workers()[0].pid
    server.proc.send_signal(signal.SIGHUP)
    # the old worker gone, not only a new one there: a connection the old one accepted as it stopped is
    # reset (CI once saw that), as under plain Gunicorn
    wait_until(lambda: len(pids := [p.pid for p in server.workers()]) == 1 and first not in pids, 30,
               "the new worker alone")  # fmt: skip
    wait_until(lambda: server.metrics_get("/healthz").json()["workers_serving"] == 1, 30, "it serving")
    assert server.get("/").json() == {"Hello": "World"}


def test_usr2_re_exec_is_refused_in_one_line_and_the_master_goes_on(start_server, app_dir):
    """Gunicorn's USR2 upgrade cannot hand over the metrics port and directory: one clear warning (not
    Python's "can't open file .../gunicorn" from a re-exec of the wrong command), the re-exec child is
    gone, and the same master, workers and metrics go on serving."""
    write_app(app_dir)
    server = start_server(app_dir, WEB_CONCURRENCY="1")
    server.wait_metrics_ready()
    before = {p.pid for p in server.master().children()}
    server.master().send_signal(signal.SIGUSR2)
    wait_until(lambda: "USR2 (upgrade by re-executing the master) is not supported" in server.logs(), 30,
               "the refusal in the log")  # fmt: skip
    wait_until(lambda: {p.pid for p in server.master().children()} == before, 30, "no child but the old ones")
    assert server.proc.poll() is None
    assert server.get("/").json() == {"Hello": "World"}
    assert server.metrics_get("/healthz").status_code == 200
    assert "can't open file" not in server.logs()
    assert server.logs().count("Starting gunicorn") == 1


def test_ctrl_c_while_the_master_starts_ends_it_without_a_traceback(start_server, app_dir, tmp_path):
    """A Ctrl-C that comes before Gunicorn has its own handlers (here: while the master runs a slow
    config file, after the metrics side has started) ends the start as SIGINT does, with no traceback,
    and nothing it started is left running."""
    write_app(app_dir)
    marker = tmp_path / "config-file-running"
    conf = tmp_path / "slow_conf.py"
    conf.write_text(f"import pathlib\nimport time\n\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(60)\n")
    server = start_server(app_dir, wait=None, GUNICORN_CONF=str(conf))
    wait_until(marker.exists, 30, "the master running the config file")
    wait_until(lambda: len(server.metrics_peers()) == 2, 30, "the metrics side started")
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(15) == -signal.SIGINT, server.logs()
    assert "Traceback" not in server.logs(), server.logs()
    server.wait_all_gone()
