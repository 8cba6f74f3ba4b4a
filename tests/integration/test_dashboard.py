"""Every query of grafana/dashboard.json answers with series from a real Prometheus scraping a real server.

The dashboard's variables are substituted as Grafana would ($__rate_interval: 30 s over 1 s scrapes, the
job, instance and app_name of this server), the Prometheus loads deploy/rules.yml (the HTTP panels read
its recorded series), each panel query goes to Prometheus' query API, and each must return at least one
series: a renamed metric, a label the server does not have, a recording rule that records nothing or a
broken expression shows up here as an empty panel would in Grafana. Panels over metrics still PLANNED
(named in names.py, not served yet) must run without error; once the server serves them, they must
return series too.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import httpx

from tests.support import client
from tests.support.apps import APP_WITH_OWN_METRICS as APP  # has /, /items/{item_id} and a raising /boom
from tests.support.paths import REPO
from tests.support.prometheus import query
from tests.support.server import write_app
from tests.support.waiting import wait_until

DASHBOARD = json.loads((Path(REPO) / "grafana" / "dashboard.json").read_text())
RULES = str(Path(REPO) / "deploy" / "rules.yml")
RATE_INTERVAL = "30s"  # what Grafana would pick for 1 s scrapes and a short time range: a few samples
# Panels whose metrics are named in names.py but not served yet may stay empty (their queries must still
# run). Every metric the dashboard reads is served now: none is.
PLANNED: set[str] = set()
METRIC_NAME = re.compile(r"(?<![\w:$\"'{])([a-z_][a-z0-9_]*(?::[a-z0-9_]+)*)(?=\{)")


def panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, legend, expression) of every target of every panel, rows' nested panels included."""
    found = []
    for panel in DASHBOARD["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target.get("legendFormat", ""), target["expr"]))
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name, value in values.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr, expr
    return expr


def send_traffic(server) -> None:
    """Successes on two routes, a 404 (no route: __unknown__) and a 500 (an exception in the app)."""
    for i in range(10):
        assert server.get(f"/items/{i}?q=x").status_code == 200
    assert server.get("/").status_code == 200
    assert server.get("/no/such/route").status_code == 404
    assert server.get("/boom").status_code == 500


def served_families(server) -> set[str]:
    """The metric families the server's /metrics holds now (names without _total/_bucket/...)."""
    return {family(name) for name in re.findall(r"^# TYPE (\S+) ", server.metrics_get().text, re.M)}


def family(series: str) -> str:
    return re.sub(r"_(total|bucket|count|sum|created)$", "", series)


def runs(base: str, expr: str) -> bool:
    """The query parses and runs (an empty result is fine)."""
    response = client.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    return response.status_code == 200 and response.json()["status"] == "success"


def label_values(base: str, label: str, match: str) -> list[str]:
    try:
        response = client.get(f"{base}/api/v1/label/{label}/values", params={"match[]": match}, timeout=5)
    except httpx.HTTPError:
        return []
    return response.json()["data"] if response.status_code == 200 else []


def test_every_dashboard_query_returns_series(start_server, app_dir, prometheus):
    write_app(app_dir, APP)
    server = start_server(app_dir, WEB_CONCURRENCY="2")
    server.wait_metrics_ready()
    base = prometheus(f"127.0.0.1:{server.metrics_port}", rule_files=(RULES,))
    values = {"job": "app", "instance": f"127.0.0.1:{server.metrics_port}", "app_name": "starlette"}
    selector = f'job="{values["job"]}", instance="{values["instance"]}"'

    wait_until(lambda: query(base, f"up{{{selector}}} == 1"), 30, "Prometheus' first successful scrape")
    # Two samples of every request series, with traffic in between: rate() and increase() need both.
    send_traffic(server)
    wait_until(
        lambda: query(base, f'starlette_requests_total{{{selector}, status_code="500"}}'),
        15,
        "a scrape holding the first requests",
    )
    send_traffic(server)
    errors = f'sum(rate(starlette_requests_total{{{selector}, status_code="500"}}[{RATE_INTERVAL}])) > 0'
    wait_until(lambda: query(base, errors), 15, "a scrape holding the second requests")
    # a few scrapes in the window, so increase() on the worker counters has samples to compare
    scrapes = f"count_over_time(up{{{selector}}}[{RATE_INTERVAL}]) >= 4"
    wait_until(lambda: query(base, scrapes), 15, "four scrapes")

    # The template variables list this server's values (Grafana's label_values() is this API call).
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"] if v["type"] == "query"}
    for name, variable in variables.items():
        match = variable["definition"].removeprefix("label_values(").rsplit(", ", 1)[0]
        match = substitute(match, {k: v for k, v in values.items() if k != name})
        found = label_values(base, name, match)
        assert values[name] in found, (name, match, found)

    queries = [(title, legend, substitute(expr, values)) for title, legend, expr in panel_queries()]
    assert len(queries) >= 30
    served = served_families(server) | {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
    expected, planned = [], []
    for title, legend, expr in queries:
        missing = {family(m) for m in METRIC_NAME.findall(expr) if ":" not in m} - served
        assert missing <= PLANNED, f"{title} [{legend}] reads {missing}, which the server does not serve"
        (planned if missing else expected).append(expr)
        assert runs(base, expr), f"{title} [{legend}]: {expr} does not run"
    results: dict[str, list[dict]] = {}

    def all_answered() -> bool:
        for expr in expected:
            if not results.get(expr):
                results[expr] = query(base, expr)
        return all(results.values())

    try:
        wait_until(all_answered, 15, "every panel query to return series")
    except AssertionError:
        empty = [
            f"{title} [{legend}]: {expr}"
            for title, legend, expr in queries
            if expr in expected and not results[expr]
        ]
        raise AssertionError("panel queries without any series:\n" + "\n".join(empty)) from None
    # the HTTP panels read recorded series: the rules of deploy/rules.yml record them from real traffic
    recorded = [e for _, _, e in queries if e in expected and ":" in "".join(METRIC_NAME.findall(e))]
    assert len(recorded) >= 6, recorded

    def value(title: str, legend: str) -> float:
        (expr,) = [e for t, lg, e in queries if t == title and lg == legend]
        return float(results[expr][0]["value"][1])

    by_path_status = next(e for t, _, e in queries if t == "Request rate by path and status")
    series = {(r["metric"]["path"], r["metric"]["status_code"]) for r in results[by_path_status]}
    assert {("/items/{item_id}", "200"), ("/", "200"), ("__unknown__", "404"), ("/boom", "500")} <= series
    assert sum(float(r["value"][1]) for r in results[by_path_status]) > 0
    assert value("Requests/s", "requests/s") > 0
    assert 0 < value("Error ratio (5xx)", "5xx ratio") < 1
    assert math.isfinite(value("Latency p50 / p95 / p99", "p99"))
    assert value("Workers desired / alive / serving", "desired") == 2
    assert value("Workers desired / alive / serving", "serving") == 2
    assert value("Target up", "{{instance}}") == 1
    assert value("Master up", "{{instance}}") == 1
    processes = next(e for t, _, e in queries if t == "Resident memory per process")
    assert {r["metric"].get("process") for r in results[processes]} >= {"master", "metrics", "w0", "w1"}
    # Grafana asks the exemplars API with the queries of the panels that show exemplars: it must accept them.
    exemplar_targets = [
        substitute(t["expr"], values)
        for panel in DASHBOARD["panels"]
        for t in panel.get("targets", [])
        if t.get("exemplar")
    ]
    assert exemplar_targets
    for expr in exemplar_targets:
        now = time.time()
        params = {"query": expr, "start": now - 60, "end": now}
        response = client.get(f"{base}/api/v1/query_exemplars", params=params, timeout=5)
        assert response.status_code == 200 and response.json()["status"] == "success", response.text
