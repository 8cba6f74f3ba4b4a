"""Exemplars across workers: a traced request's trace id reaches a real Prometheus
as its bucket's exemplar.
"""

from __future__ import annotations

import time

import httpx

from tests.support import client
from tests.support.server import write_app
from tests.support.waiting import wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def test_traceparent_becomes_an_exemplar_in_prometheus(start_server, app_dir, prometheus):
    write_app(app_dir)  # the Quick Start app
    server = start_server(app_dir, WEB_CONCURRENCY="2")
    server.wait_metrics_ready()
    traced = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"}
    for _ in range(10):  # over two workers: the exemplar is kept in whichever served it
        assert server.get("/items/5?q=x", headers=traced).status_code == 200
        assert server.get("/items/6").status_code == 200  # untraced: does not replace the exemplar

    openmetrics = server.metrics_get(headers={"Accept": OPENMETRICS})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    lines = [line for line in openmetrics.text.splitlines() if f'trace_id="{TRACE_ID}"' in line]
    # one per bucket the traced requests landed in (timing decides how many), on bucket lines only
    assert lines and all(line.startswith("starlette_request_duration_seconds_bucket{") for line in lines)
    assert all(f'span_id="{SPAN_ID}"' in line and 'path="/items/{item_id}"' in line for line in lines)
    assert "trace_id" not in server.metrics_get().text  # the classic text format has no exemplars

    base = prometheus(f"127.0.0.1:{server.metrics_port}", flags=("--enable-feature=exemplar-storage",))

    def exemplar_trace_ids() -> set[str]:
        now = time.time()
        try:
            response = client.get(
                f"{base}/api/v1/query_exemplars",
                params={
                    "query": 'starlette_request_duration_seconds_bucket{path="/items/{item_id}"}',
                    "start": now - 600,
                    "end": now + 60,
                },
                timeout=5,
            )
        except httpx.HTTPError:
            return set()
        if response.status_code != 200:
            return set()
        return {
            exemplar["labels"].get("trace_id", "")
            for series in response.json()["data"]
            for exemplar in series["exemplars"]
        }

    found = wait_until(lambda: exemplar_trace_ids() or None, 60, "Prometheus to store an exemplar")
    assert found == {TRACE_ID}
