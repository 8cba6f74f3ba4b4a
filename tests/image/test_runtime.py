"""What the image adds to upstream, against real containers: the metrics port, /healthz, the Docker
HEALTHCHECK, a graceful stop with a request in flight, a clean restart and running as non-root."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.containers import APPS, DOCKER_STOP_GRACE, Container, Response
from tests.support.metrics_text import total
from tests.support.paths import REPO

pytestmark = pytest.mark.image

REQUESTS = "starlette_requests_total"


def request_count(container: Container, path_prefix: str) -> float:
    """Sum of the aggregated request counter for GET <path_prefix>... answered 200, from /metrics."""
    return total(
        container.get("/metrics", 9464).text,
        REQUESTS,
        lambda labels: labels.get("path", "").startswith(path_prefix),
        method="GET",
        status_code="200",
    )


def get_many(container: Container, paths: list[str], parallel: int = 8) -> list[Response]:
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(container.get, paths))


@pytest.fixture(scope="module")
def served(engine, image, container_factory) -> Iterator[Container]:
    """The image as it comes, default worker count (2 or more): shared by the tests below, in order."""
    c = container_factory(image, fast_health=True)
    try:
        c.wait_http("/")
        c.wait_http("/healthz", 9464)
        yield c
    finally:
        engine.remove_containers([c.id])


def test_metrics_port_aggregates_every_worker(served):
    workers = served.config_line()["workers"]
    assert workers >= 2
    responses = get_many(served, [f"/items/{i}?q=x" for i in range(60)])
    assert all(r.status == 200 for r in responses)
    # One number for the whole container, whichever worker answered each request.
    served.wait_until(lambda: request_count(served, "/items/") == 60, "60 requests counted on /metrics")
    metrics = served.get("/metrics", 9464)
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert served.get("/nothing-here", 9464).status == 404
    # The app's own port serves no metrics.
    assert served.get("/metrics").status == 404


def test_healthz_reports_serving_workers(served):
    resp = served.get("/healthz", 9464)
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["status"] == "ok"
    assert 1 <= body["workers_serving"] <= (workers := served.config_line()["workers"])
    # Every worker, once each has booted (on a loaded machine one may still be importing the app after
    # the other has served every request so far).
    served.wait_until(
        lambda: served.get("/healthz", 9464).json()["workers_serving"] == workers,
        f"/healthz to report {workers} workers serving",
    )


def test_healthcheck_becomes_healthy(served):
    assert served.wait_healthy() == "healthy"


def test_restart_starts_clean(served):
    assert request_count(served, "/items/") > 0
    startups = served.logs().count("Application startup complete.")
    served.restart()
    assert served.wait_http("/").json() == {"Hello": "World"}
    served.wait_http("/healthz", 9464)
    # /healthz answers once one worker serves; the second may still be starting: wait for both
    served.wait_until(
        lambda: served.logs().count("Application startup complete.") >= startups + 2,
        "both workers of the restarted container to start",
    )
    logs = served.logs()
    assert logs.count("Checking for script in /app/prestart.sh") == 2
    # The multiprocess directory is emptied at start: nothing from the first run is counted again.
    assert request_count(served, "/items/") == 0
    assert served.wait_healthy() == "healthy"


def test_stop_ends_with_exit_code_0(served):
    served.stop(timeout=DOCKER_STOP_GRACE)  # exit code 0 below: no SIGKILL at the grace's end
    assert served.exit_code() == 0


def test_stop_lets_the_request_in_flight_finish(image, make_container):
    c = make_container(image, env={"WEB_CONCURRENCY": "1"}, files={APPS / "slow" / "main.py": "/app/main.py"})
    c.wait_http("/")
    result: dict[str, object] = {}

    def slow_request() -> None:
        try:
            result["response"] = c.get("/slow?seconds=3", timeout=30)
        except OSError as err:
            result["error"] = err

    thread = threading.Thread(target=slow_request)
    thread.start()
    c.wait_until(lambda: c.get("/inflight").json()["in_flight"] == 1, "the slow request is in flight")
    took = c.stop(timeout=15)
    thread.join(30)
    assert "error" not in result, result
    response = result["response"]
    assert isinstance(response, Response)
    assert response.status == 200
    assert response.json() == {"slept": 3.0}
    assert c.exit_code() == 0
    assert took < 12, f"stop took {took:.1f}s: the server was killed, not stopped gracefully"
    assert "Shutting down" in c.logs() or "Handling signal: term" in c.logs()


def test_non_root_on_a_high_port(image, make_container):
    c = make_container(
        image, env={"PORT": "8080", "WEB_CONCURRENCY": "2"}, ports=(8080, 9464), args=["--user", "1000"]
    )
    assert c.wait_http("/", 8080).json() == {"Hello": "World"}
    assert c.py("import os; print(os.geteuid())").strip() == "1000"
    with ThreadPoolExecutor(4) as pool:
        assert all(r.status == 200 for r in pool.map(lambda _: c.get("/", 8080), range(10)))
    c.wait_until(lambda: request_count(c, "/") >= 10, "requests counted on /metrics as non-root")
    assert c.wait_http("/healthz", 9464).json()["workers_serving"] == 2
    c.stop(timeout=DOCKER_STOP_GRACE)  # exit code 0 below: no SIGKILL at the grace's end
    assert c.exit_code() == 0


def test_non_root_on_port_80_says_why_it_cannot_start(image, make_container):
    # Docker lets any user bind low ports by default (ip_unprivileged_port_start=0); Kubernetes and
    # podman do not: reproduce that here on either engine.
    c = make_container(image, args=["--user", "1000", "--sysctl", "net.ipv4.ip_unprivileged_port_start=1024"])
    code = c.wait_exited(timeout=30)
    logs = c.logs()
    assert code != 0
    assert "PORT=80" in logs
    assert "8080" in logs  # what to do instead
    assert "Traceback" not in logs


def test_image_metadata(engine, image):
    data = json.loads(engine.run("image", "inspect", image).stdout)[0]
    config = data["Config"]
    assert set(config["ExposedPorts"]) == {"80/tcp", "9464/tcp"}
    assert config["Cmd"] == ["/start.sh"]
    assert config["WorkingDir"] == "/app"
    assert "PYTHONPATH=/app" in config["Env"]
    assert not config.get("User")  # root by default, like upstream; `--user 1000` works (above)
    health = config.get("Healthcheck") or data.get("Healthcheck") or data.get("HealthCheck")
    assert health and health["Test"] == ["CMD", "python", "-m", "gunicorn_prometheus", "healthcheck"]
    labels = config.get("Labels") or data.get("Labels") or {}
    assert labels["org.opencontainers.image.title"] == "gunicorn-prometheus"
    assert labels["org.opencontainers.image.source"].startswith("https://")


@pytest.mark.parametrize("own_counter", [True, False])
def test_upstream_style_conf_non_root_read_only_keeps_exact_metrics(image, make_container, own_counter):
    """A user conf that imports nothing of ours (binding 8080 itself), as uid 1000 on a read-only root."""
    files = {APPS / "upstream_conf" / "gunicorn_conf.py": "/app/gunicorn_conf.py"}
    if own_counter:
        files[REPO / "examples" / "project" / "app" / "main.py"] = "/app/main.py"
    c = make_container(image, files=files, ports=(8080, 9464), args=["--user", "1000", "--read-only"])
    assert c.wait_http("/", 8080).json() == {"Hello": "World"}
    assert c.py("import os; print(os.geteuid())").strip() == "1000"
    with ThreadPoolExecutor(4) as pool:
        assert all(r.status == 200 for r in pool.map(lambda _: c.get("/items/1", 8080), range(10)))
    c.wait_until(lambda: request_count(c, "/items/") == 10, "exactly the 10 requests counted")
    assert c.wait_http("/healthz", 9464).json()["workers_serving"] == 2
    if own_counter:
        c.wait_until(lambda: "items_read_total 10.0" in c.get("/metrics", 9464).text, "the app's own counter")
    c.stop(timeout=DOCKER_STOP_GRACE)  # exit code 0 below: no SIGKILL at the grace's end
    assert c.exit_code() == 0


def test_non_root_with_its_bind_in_gunicorn_cmd_args(image, make_container):
    """The bind checked is the one used: PORT stays 80, GUNICORN_CMD_ARGS binds 8080, as uid 1000."""
    c = make_container(
        image,
        env={"GUNICORN_CMD_ARGS": "--bind 0.0.0.0:8080", "WEB_CONCURRENCY": "1"},
        ports=(8080, 9464),
        args=["--user", "1000", "--sysctl", "net.ipv4.ip_unprivileged_port_start=1024"],
    )
    assert c.wait_http("/", 8080).json() == {"Hello": "World"}
    c.wait_until(lambda: request_count(c, "/") >= 1, "the request counted")
