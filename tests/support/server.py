"""The start scripts (image/start.sh, start-reload.sh) as real processes, each with an app directory.

Each server runs in its own session, so that stopping it can find and end everything it forked; readiness
is polled, never slept for. The `start_server` fixture (tests/conftest.py) stops every server at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from gunicorn_prometheus import settings
from gunicorn_prometheus.metrics_process import PROCESS_NAME as METRICS_PROCESS_NAME
from tests.support import client
from tests.support.net import free_port
from tests.support.paths import REPO, VENV_BIN
from tests.support.waiting import wait_until

QUICK_START = (REPO / "examples" / "app" / "main.py").read_text()  # the upstream Quick Start app


def write_app(app_dir: Path, source: str = QUICK_START, path: str = "main.py") -> Path:
    """Write an app's source (dedented) into the app directory, creating packages' folders as needed."""
    target = app_dir / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(textwrap.dedent(source))
    return target


@dataclass
class Server:
    proc: subprocess.Popen
    env: dict[str, str]
    log_path: Path
    port: int
    metrics_port: int
    host: str = "127.0.0.1"
    _log_offset: int = field(default=0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def config(self) -> dict:
        """The JSON line of effective settings printed at start-up."""
        for line in self.logs().splitlines():
            if line.startswith("{") and '"workers"' in line:
                return json.loads(line)
        raise AssertionError("no start-up JSON line in the logs:\n" + self.logs())

    def get(self, path: str, **kwargs) -> httpx.Response:
        return client.get(self.url + path, timeout=10, **kwargs)

    def metrics_get(self, path: str = "/metrics", **kwargs) -> httpx.Response:
        return client.get(self.metrics_url + path, timeout=10, **kwargs)

    def master(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def _children(self) -> list[tuple[psutil.Process, str]]:
        """Live children of the master with their command lines (zombies and vanished ones left out)."""
        found = []
        for p in self.master().children():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append((p, " ".join(p.cmdline())))
            except psutil.Error:
                continue
        return found

    def workers(self) -> list[psutil.Process]:
        """Worker processes as the OS sees them: the master's children, less the metrics side."""
        return [p for p, cmd in self._children() if not cmd.startswith(METRICS_PROCESS_NAME)]

    def metrics_peers(self) -> list[psutil.Process]:
        """The metrics server's processes (two peers, whoever their parent is now)."""
        found = []
        for p in self.session_processes():
            try:
                if p.cmdline()[:1] == [METRICS_PROCESS_NAME]:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def metrics_peer_replaced(self, old: psutil.Process) -> bool:
        """Whether a killed metrics peer has a replacement: two peers again, `old` not among them."""
        peers = self.metrics_peers()
        return len(peers) == 2 and old.pid not in {p.pid for p in peers}

    def wait_ready(self, path: str = "/", timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return self.get(path).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"{self.url}{path}")

    def wait_metrics_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            try:
                return self.metrics_get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"{self.metrics_url}/healthz")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the master like `docker stop` does, then make sure its whole session is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        leftovers = self.session_processes()
        for p in leftovers:
            p.kill()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def failed_start_logs(self, timeout: float = 30.0) -> str:
        """The logs of a start that must fail: a non-zero exit, and no Python traceback on the way."""
        assert self.proc.wait(timeout) != 0, self.logs()
        logs = self.logs()
        assert "Traceback" not in logs, logs
        return logs

    def wait_all_gone(self, timeout: float = 5.0) -> None:
        """Every process the server started ends within `timeout` of the server's own exit.

        Not at the same instant: e.g. multiprocessing's resource tracker, which Uvicorn's reloader starts,
        leaves once its last user has exited.
        """
        wait_until(lambda: not self.session_processes(), timeout, "every process of the server to end")

    def session_processes(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.proc.pid and p.pid != self.proc.pid and p.status() != "zombie":
                    found.append(p)
            except (ProcessLookupError, psutil.Error, OSError):
                continue
        return found


def clean_environ() -> dict[str, str]:
    """The test runner's environment without any of our settings, so a developer's shell cannot leak in."""
    env = {k: v for k, v in os.environ.items() if k not in settings.BY_NAME}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def scrape(server: Server, **headers: str) -> str:
    """The text of one /metrics scrape of `server` (which must answer 200)."""
    response = server.metrics_get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return response.text


def scrape_until(server: Server, check: Callable[[str], object], what: str, timeout: float = 15.0) -> str:
    """Scrape until `check(text)` holds (workers publish their request metrics within a second or so);
    the last scrape is shown when it never does."""
    last = {"text": ""}

    def attempt() -> bool:
        last["text"] = scrape(server)
        return bool(check(last["text"]))

    wait_until(attempt, timeout, what, details=lambda: "last scrape:\n" + last["text"])
    return last["text"]


class ServerStarter:
    """Starts servers for one test, each on loopback ports of its own, and stops them all at the end."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.servers: list[Server] = []

    def __call__(
        self, app_dir: Path, script: str = "start.sh", wait: str | None = "/", **overrides: str | None
    ) -> Server:
        """Start image/<script> for `app_dir`; `overrides` set (None: unset) environment variables."""
        port = int(overrides.get("PORT") or free_port())
        metrics_port = int(overrides.get("METRICS_PORT") or free_port())
        env = clean_environ()
        env.update(
            {
                "APP_DIR": str(app_dir),
                "DEFAULT_GUNICORN_CONF": str(REPO / "gunicorn_conf.py"),
                "HOST": "127.0.0.1",
                "PORT": str(port),
                "METRICS_HOST": "127.0.0.1",
                "METRICS_PORT": str(metrics_port),
                "PROMETHEUS_MULTIPROC_DIR": str(self.work_dir / f"multiproc-{metrics_port}"),
            }
        )
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        log_path = self.work_dir / f"server-{len(self.servers)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(REPO / "image" / script)],
                cwd=self.work_dir,  # not the app directory: the start script must find the app by itself
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(proc, env, log_path, port, metrics_port)
        self.servers.append(server)
        if wait:
            server.wait_ready(wait)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()
