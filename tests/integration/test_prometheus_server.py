"""A real Prometheus server (Debian's package) scrapes the metrics port; its query API sees our series."""

from __future__ import annotations

import shutil
import subprocess
import textwrap

import httpx
import pytest
from conftest import free_port, wait_until, write_app


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus on loopback with a config written by the test, and rule files; stopped at teardown."""
    binary = shutil.which("prometheus")
    assert binary, "the Debian package `prometheus` is missing: run scripts/install --test"
    procs = []

    def start(target: str, rule_files: tuple[str, ...] = ()) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            textwrap.dedent(f"""
            global:
              scrape_interval: 1s
              scrape_timeout: 1s
              evaluation_interval: 1s
            rule_files: {list(rule_files)!r}
            scrape_configs:
              - job_name: app
                static_configs:
                  - targets: ["{target}"]
        """)
        )
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(base: str, expr: str) -> list[dict]:
    try:
        response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    except httpx.HTTPError:
        return []
    if response.status_code != 200:
        return []
    return response.json()["data"]["result"]


def test_prometheus_scrapes_the_metrics_port(start_server, app_dir, prometheus):
    write_app(app_dir)
    server = start_server(app_dir, WEB_CONCURRENCY="2")
    server.wait_metrics_ready()
    for _ in range(25):
        assert server.get("/items/5?q=x").status_code == 200
    base = prometheus(f"127.0.0.1:{server.metrics_port}")

    expr = 'starlette_requests_total{path="/items/{item_id}",status_code="200",method="GET"}'
    result = wait_until(lambda: query(base, expr), 60, "Prometheus to hold the request counter")
    assert len(result) == 1 and float(result[0]["value"][1]) == 25
    assert result[0]["metric"]["app_name"] == "starlette"

    up = wait_until(lambda: query(base, 'up{job="app"}'), 30, "the up series")
    assert float(up[0]["value"][1]) == 1
    alive = wait_until(lambda: query(base, "gunicorn_workers_alive"), 30, "gunicorn_workers_alive")
    assert float(alive[0]["value"][1]) == 2
    processes = wait_until(lambda: query(base, "gunicorn_process_resident_memory_bytes"), 30, "process stats")
    assert {r["metric"]["process"] for r in processes} == {"master", "w0", "w1", "metrics"}
    # the scrape health series Prometheus keeps about the target: no scrape errors, samples present
    samples = wait_until(lambda: query(base, 'scrape_samples_scraped{job="app"} > 0'), 30, "scrape samples")
    assert float(samples[0]["value"][1]) > 20
