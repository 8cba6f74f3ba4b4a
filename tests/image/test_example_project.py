"""examples/project: a user's image built FROM ours, whose own Counter is summed over every worker."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.containers import DOCKER_STOP_GRACE, RUN_ID
from tests.support.metrics_text import value
from tests.support.paths import REPO

pytestmark = pytest.mark.image


def items_read(container) -> float:
    return value(container.get("/metrics", 9464).text, "items_read_total")


def test_user_project_counter_is_aggregated(engine, image, make_container):
    tag = f"localhost/gunicorn-prometheus-example:{RUN_ID}"
    engine.build(tag, REPO / "examples" / "project", build_args={"IMAGE": image})
    c = make_container(tag, env={"WEB_CONCURRENCY": "2"})
    assert c.wait_http("/").json() == {"Hello": "World"}
    c.wait_http("/healthz", 9464)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(c.get, [f"/items/{i}" for i in range(50)]))
    assert [r.json()["item_id"] for r in responses] == list(range(50))
    c.wait_until(lambda: items_read(c) == 50, "items_read_total == 50 on the metrics port")
    c.stop(timeout=DOCKER_STOP_GRACE)  # exit code 0 below: no SIGKILL at the grace's end
    assert c.exit_code() == 0
