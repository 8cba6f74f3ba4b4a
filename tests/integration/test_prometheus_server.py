"""A real Prometheus server (Debian's package) scrapes the metrics port; its query API sees our series."""

from __future__ import annotations

from tests.support.prometheus import query
from tests.support.server import write_app
from tests.support.waiting import wait_until


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
