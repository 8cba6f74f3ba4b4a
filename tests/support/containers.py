"""A container engine (Docker or podman, by its CLI) and containers of the image, for the image tests."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.paths import REPO
from tests.support.waiting import wait_until

APPS = REPO / "tests" / "image" / "apps"
RUN_ID = uuid.uuid4().hex[:10]
LABEL = f"gunicorn-prometheus-tests={RUN_ID}"
STOP_TIMEOUT = 15  # seconds; above the image's GRACEFUL_TIMEOUT default (8)
#: `docker stop`'s default grace: a stop with it that ends in exit code 0 was not SIGKILLed.
DOCKER_STOP_GRACE = 10


# --- the engine -------------------------------------------------------------------------------------


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class Engine:
    cli: str
    created_images: list[str] = field(default_factory=list)

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.cli, *args], capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`{self.cli} {' '.join(args)}` exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    @property
    def is_podman(self) -> bool:
        return Path(self.cli).name == "podman"

    def build(
        self,
        tag: str,
        context: Path,
        dockerfile: Path | None = None,
        build_args: dict[str, str] | None = None,
    ) -> None:
        args = ["build", "-t", tag, "--label", LABEL]
        if self.is_podman:
            # HEALTHCHECK is only kept in the docker image format; there is no registry to pull from here.
            args += ["--format", "docker", "--pull=never"]
        if dockerfile is not None:
            args += ["-f", str(dockerfile)]
        for name, value in (build_args or {}).items():
            args += ["--build-arg", f"{name}={value}"]
        args.append(str(context))
        self.created_images.append(tag)
        self.run(*args, timeout=900)

    def remove_containers(self, ids: list[str]) -> None:
        if not ids:
            return
        # podman's rm -f stops with the given timeout; docker's kills at once (no timeout to pass).
        force = ["rm", "-f", "-t", "2"] if self.is_podman else ["rm", "-f"]
        self.run(*force, *ids, check=False, timeout=120)

    def cleanup(self) -> None:
        self.remove_containers(
            self.run("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
        )
        for tag in reversed(self.created_images):
            self.run("rmi", "-f", tag, check=False, timeout=120)
        if self.is_podman:
            # Intermediate layers of our builds (dangling after the rmi above).
            self.run("image", "prune", "-f", "--filter", f"label={LABEL}", check=False, timeout=120)


# --- containers --------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def http_get(port: int, path: str = "/", timeout: float = 10) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return Response(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


class Container:
    def __init__(self, engine: Engine, cid: str, name: str) -> None:
        self.engine = engine
        self.id = cid
        self.name = name

    def inspect(self) -> dict:
        return json.loads(self.engine.run("inspect", self.id).stdout)[0]

    @property
    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def logs(self) -> str:
        proc = self.engine.run("logs", self.id, check=False)
        return proc.stdout + proc.stderr

    def host_port(self, container_port: int) -> int:
        out = self.engine.run("port", self.id, f"{container_port}/tcp").stdout.split()
        if not out:
            raise AssertionError(f"port {container_port} of {self.name} is not published")
        return int(out[0].rpartition(":")[2])

    def get(self, path: str = "/", container_port: int = 80, timeout: float = 10) -> Response:
        return http_get(self.host_port(container_port), path, timeout)

    def exec(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.engine.run("exec", self.id, *cmd, check=check, timeout=timeout)

    def py(self, code: str) -> str:
        """Run Python code inside the container and return its stdout."""
        return self.exec("python", "-c", code).stdout

    def copy_in(self, src: Path | str, dest: str) -> None:
        """`cp` semantics: a directory `src` becomes `dest`; "<dir>/." copies the directory's contents."""
        self.engine.run("cp", str(src), f"{self.id}:{dest}")

    def start(self) -> None:
        self.engine.run("start", self.id)

    def stop(self, timeout: int = STOP_TIMEOUT) -> float:
        """Stop with an explicit timeout; return the seconds it took."""
        started = time.monotonic()
        self.engine.run("stop", "-t", str(timeout), self.id, timeout=timeout + 60)
        return time.monotonic() - started

    def restart(self, timeout: int = STOP_TIMEOUT) -> None:
        self.engine.run("restart", "-t", str(timeout), self.id, timeout=timeout + 60)

    def exit_code(self) -> int:
        return int(self.inspect()["State"]["ExitCode"])

    def wait_exited(self, timeout: float = 30) -> int:
        def exited() -> bool:
            state = self.inspect()["State"]
            return not state["Running"] and state.get("Status") in ("exited", "stopped", "dead")

        wait_until(exited, timeout, f"{self.name} to exit", interval=0.2, details=self.logs)
        return self.exit_code()

    def _get_while_running(self, port: int, path: str, status: int | None) -> Response | None:
        """One try of wait_http: the response if it is the one wanted; fail at once if the container exits."""
        try:
            resp = http_get(port, path, timeout=5)
            if status is None or resp.status == status:
                return resp
        except OSError:
            pass
        if not self.running:
            raise AssertionError(
                f"{self.name} exited ({self.exit_code()}) before serving {path}\n{self.logs()}"
            )
        return None

    def wait_http(
        self, path: str = "/", container_port: int = 80, timeout: float = 45, status: int | None = 200
    ) -> Response:
        """Poll until the published port answers (with `status` if given); fail early if it exits."""
        port = self.host_port(container_port)
        return wait_until(
            lambda: self._get_while_running(port, path, status),
            timeout,
            f"{self.name} to serve {path} on {container_port}",
            interval=0.1,
            details=self.logs,
        )

    def health_status(self) -> str | None:
        state = self.inspect()["State"]
        health = state.get("Health") or state.get("Healthcheck") or {}
        return health.get("Status")

    def wait_healthy(self, timeout: float = 60) -> str:
        """Until the engine reports the image's HEALTHCHECK healthy; podman's checks are run from here."""

        def healthy() -> str | None:
            if self.engine.is_podman:
                self.engine.run("healthcheck", "run", self.id, check=False)
            status = self.health_status()
            if status != "healthy" and not self.running:
                raise AssertionError(f"{self.name} exited while not healthy ({status})\n{self.logs()}")
            return status if status == "healthy" else None

        return wait_until(healthy, timeout, f"{self.name} to be healthy", interval=0.5, details=self.logs)

    def wait_until(self, predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
        """Poll `predicate` (connection errors count as False) until it holds; fail with the logs."""
        wait_until(
            predicate,
            timeout,
            f"{self.name}: {what}",
            interval=0.1,
            ignore=(OSError, ValueError),
            details=self.logs,
        )

    def wait_log(self, text: str, timeout: float = 30) -> str:
        return wait_until(
            lambda: logs if text in (logs := self.logs()) else None,
            timeout,
            f"{text!r} in the logs of {self.name}",
            interval=0.2,
            details=self.logs,
        )

    def _inside_once(self, code: str) -> subprocess.CompletedProcess | None:
        """One try of wait_inside: the snippet if it exited 0; fail at once if the container is gone."""
        proc = self.exec("python", "-c", code, check=False)
        if proc.returncode == 0:
            return proc
        if not self.running:
            raise AssertionError(f"{code!r} never succeeded in {self.name}: {proc.stderr}\n{self.logs()}")
        return None

    def wait_inside(self, code: str, timeout: float = 60) -> str:
        """Poll a Python snippet run inside the container until it exits 0 (for ports not published)."""
        done = wait_until(
            lambda: self._inside_once(code),
            timeout,
            f"{code!r} to succeed in {self.name}",
            interval=0.2,
            details=self.logs,
        )
        return done.stdout

    def config_line(self) -> dict:
        """The JSON line of effective settings that the runtime prints at start-up (the last one)."""
        found = None
        for line in self.logs().splitlines():
            line = line.strip()
            if line.startswith("{") and '"workers"' in line:
                with contextlib.suppress(ValueError):
                    found = json.loads(line)
        if found is None:
            raise AssertionError(f"no JSON settings line in the logs of {self.name}\n{self.logs()}")
        return found
