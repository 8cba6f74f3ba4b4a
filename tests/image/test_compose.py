"""docker-compose.yml run for real: the app image and Prometheus with deploy/rules.yml, in podman-compose.

`podman-compose up` runs our docker-compose.yml with an override file (written here) that:
- leaves Grafana out (a profile nobody enables): Grafana cannot run here;
- uses the image under test for `app`, with an app that has a failing route mounted at /app;
- publishes every port on 127.0.0.1 at free ports (never on other addresses, never fixed ports);
- gives Prometheus deploy/prometheus.yml with 1 s scrape and evaluation intervals (a 15 s interval would
  make the test wait minutes); the rules file mounted is deploy/rules.yml itself.
The Prometheus image is the local stand-in of scripts/podman-prometheus (Debian's package). Through that
Prometheus' HTTP API the test checks that the target is up, that the recording rules produce data from the
traffic it sends, and that GunicornHigh5xxRatio goes pending when the app answers 5xx. `down` removes the
containers, pod, network and volumes; the test checks that nothing of the project is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml

from tests.support.containers import RUN_ID, Engine, http_get
from tests.support.net import free_port
from tests.support.paths import REPO

pytestmark = pytest.mark.image

PROJECT = f"gp-compose-{RUN_ID}"


def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def compose_command(engine: Engine) -> list[str]:
    if engine.is_podman:
        found = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
        assert Path(found).exists(), "podman-compose is missing: run scripts/install --test"
        return [found]
    return [engine.cli, "compose"]


def write_override(tmp_path: Path, image: str, ports: dict[str, int]) -> Path:
    prometheus_config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    prometheus_config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config))
    config_path.chmod(0o644)  # the stand-in runs Prometheus as nobody, like the official image
    rules_mount = next(
        v
        for v in yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["prometheus"][
            "volumes"
        ]
        if v.startswith("./deploy/rules.yml:")
    )
    # `!override` replaces a list instead of appending to it (compose spec; podman-compose >= 1.1).
    text = f"""\
services:
  app:
    image: {image}
    environment:
      WEB_CONCURRENCY: "2"
    volumes:
      - ./tests/image/apps/compose:/app:ro
    ports: !override
      - "127.0.0.1:{ports["app"]}:80"
      - "127.0.0.1:{ports["metrics"]}:9464"
    restart: "no"
  prometheus:
    volumes: !override
      - {config_path}:/etc/prometheus/prometheus.yml:ro
      - {rules_mount}
    ports: !override
      - "127.0.0.1:{ports["prometheus"]}:9090"
    restart: "no"
  grafana:
    profiles: ["grafana"]
"""
    path = tmp_path / "compose.override.yml"
    path.write_text(text)
    return path


def prometheus_query(port: int, expr: str) -> list[dict]:
    try:
        response = http_get(port, "/api/v1/query?" + urlencode({"query": expr}), timeout=5)
    except OSError:
        return []
    return response.json()["data"]["result"] if response.status == 200 else []


def alerts(port: int) -> list[dict]:
    try:
        response = http_get(port, "/api/v1/alerts", timeout=5)
    except OSError:
        return []
    return response.json()["data"]["alerts"] if response.status == 200 else []


def leftovers(engine: Engine) -> list[str]:
    label = (
        f"io.podman.compose.project={PROJECT}"
        if engine.is_podman
        else f"com.docker.compose.project={PROJECT}"
    )
    found = engine.run("ps", "-aq", "--filter", f"label={label}", check=False).stdout.split()
    networks = engine.run("network", "ls", "--format", "{{.Name}}", check=False).stdout.split()
    found += [n for n in networks if n.startswith(PROJECT)]
    if engine.is_podman:
        pods = engine.run("pod", "ps", "--format", "{{.Name}}", check=False).stdout.split()
        found += [p for p in pods if PROJECT in p]
    return found


def test_compose_stack_scrapes_records_and_alerts(engine, image, tmp_path):
    if engine.is_podman:
        setup = subprocess.run(
            ["bash", str(REPO / "scripts" / "podman-prometheus")], capture_output=True, text=True, timeout=600
        )
        assert setup.returncode == 0, setup.stdout + setup.stderr
    ports = {name: free_port() for name in ("app", "metrics", "prometheus")}
    override = write_override(tmp_path, image, ports)
    compose = [*compose_command(engine), "-p", PROJECT, "-f", "docker-compose.yml", "-f", str(override)]
    env = {**os.environ, "PODMAN_COMPOSE_WARNING_LOGS": "false"}

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*compose, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
        )

    started = time.monotonic()
    try:
        up = run("up", "-d")
        assert up.returncode == 0, up.stdout + up.stderr
        services = set(run("config", "--services").stdout.split())
        assert services == {"app", "prometheus"}, services  # Grafana left out by its profile

        def app_ready() -> bool:
            try:
                return http_get(ports["app"], "/", timeout=2).status == 200
            except OSError:
                return False

        poll(app_ready, 90, "the app on its published port")
        prometheus = ports["prometheus"]
        poll(lambda: prometheus_query(prometheus, 'up{job="app", instance="app:9464"} == 1'), 60, "target up")

        # One request per route first, and a scrape that holds their series: rate() counts increases
        # between samples, so requests made before a series' first scrape would never show.
        assert [http_get(ports["app"], p).status for p in ("/items/1", "/fail")] == [200, 503]
        poll(
            lambda: prometheus_query(prometheus, 'starlette_requests_total{path="/fail", status_code="503"}'),
            30,
            "a scrape holding the failing route",
        )
        # Then 400 successes and 100 failures (20 %): over rate()'s 5-minute window that is more than the
        # alert's 1 request/s guard (300 requests) even though they arrive within seconds.
        paths = (["/", "/items/7?q=x", "/items/8", "/"] * 100) + ["/fail"] * 100
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda p: http_get(ports["app"], p).status, paths))
        assert statuses.count(200) == 400 and statuses.count(503) == 100

        # the recording rules produce data from that traffic
        by_route = poll(
            lambda: prometheus_query(
                prometheus,
                'instance_path_status:starlette_requests:rate1m{path="/fail", status_code="503"} > 0',
            ),
            30,
            "the recorded per-route rate of the failing route",
        )
        assert by_route[0]["metric"]["instance"] == "app:9464"
        # A scrape in the middle of the burst holds the successes but few failures (seen once: 0.00998,
        # 4 failures in 401): wait for a rule evaluation over a scrape taken after the burst.
        ratio = poll(
            lambda: prometheus_query(prometheus, "instance:starlette_requests_5xx:ratio_rate5m > 0.1"),
            30,
            "the recorded 5xx ratio of the whole burst",
        )
        assert 0.1 < float(ratio[0]["value"][1]) < 0.3
        assert poll(
            lambda: prometheus_query(
                prometheus, "instance_le:starlette_request_duration_seconds_bucket:rate1m"
            ),
            30,
            "the recorded latency buckets",
        )

        # ...and the 5xx alert goes pending (it fires after its `for: 5m`, beyond this test)
        def pending() -> list[dict]:
            return [a for a in alerts(prometheus) if a["labels"]["alertname"] == "GunicornHigh5xxRatio"]

        (alert,) = poll(pending, 30, "GunicornHigh5xxRatio to go pending")
        assert alert["state"] == "pending", alert
        assert alert["labels"]["severity"] == "critical" and alert["labels"]["instance"] == "app:9464"
        assert alert["annotations"]["runbook_url"].endswith("docs/alerts.md#gunicornhigh5xxratio")
        # nothing fires: the stack is otherwise healthy (no crash loop, no metric write errors)
        firing = [a["labels"]["alertname"] for a in alerts(prometheus) if a["state"] == "firing"]
        assert not firing, firing
        print(json.dumps({"compose_test_seconds_until_pending": round(time.monotonic() - started, 1)}))
    finally:
        down = run("down", "-v", "-t", "5")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not leftovers(engine), leftovers(engine)
