"""The alerts of deploy/rules.yml against real faults: a real Prometheus with the rules watches a server.

promtool's unit tests (tests/unit/rules_test.yml) prove the expressions on synthetic series; here the
series are the server's own, so a renamed metric, a label the rules expect and the server lacks, or an
exit counted under another reason would keep an alert silent, and a healthy series that trips an alert
would show as a false alarm.
"""

from __future__ import annotations

import random
import signal
import time

import httpx

from tests.support import client
from tests.support.faults import LEAN, TINY_APP, kill_worker
from tests.support.paths import REPO
from tests.support.prometheus import query
from tests.support.server import write_app
from tests.support.waiting import wait_until

RULES = str(REPO / "deploy" / "rules.yml")


def alerts(base: str) -> list[dict]:
    try:
        response = client.get(f"{base}/api/v1/alerts", timeout=5)
    except httpx.HTTPError:
        return []
    return response.json()["data"]["alerts"] if response.status_code == 200 else []


def alert(base: str, name: str, state: str) -> list[dict]:
    return [a for a in alerts(base) if a["labels"]["alertname"] == name and a["state"] == state]


def test_crash_loop_fires_and_target_down_goes_pending(start_server, app_dir, prometheus, figures):
    """Workers killed in a loop, then the whole server killed: the alerts that should, and only those.

    Two workers; four SIGKILLs, each once the replacement serves. GunicornWorkerCrashLoop (more than 3
    `crash` exits in 15 minutes, no `for`) fires for this target with reason `crash`, and no other alert
    fires. Then the master is killed with SIGKILL (the metrics side leaves with it): GunicornMetricsTargetDown
    goes pending for this target (it would fire after its 2 minutes, beyond the test).
    """
    write_app(app_dir, TINY_APP)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    target = f"127.0.0.1:{server.metrics_port}"
    base = prometheus(target, rule_files=(RULES,))
    # a sample of the crash counter before the first kill: increase() counts from there
    wait_until(
        lambda: query(base, 'gunicorn_worker_exits_total{reason="crash"} == 0'),
        30,
        "a scrape before the kills",
    )
    assert not alerts(base)

    rng = random.Random(10)
    for _ in range(4):
        wait_until(
            lambda: server.metrics_get("/healthz").json()["workers_serving"] == 2, 30, "both workers serving"
        )
        assert kill_worker(server, rng) is not None
    killed = time.monotonic()
    (crash_loop,) = wait_until(
        lambda: alert(base, "GunicornWorkerCrashLoop", "firing"), 30, "GunicornWorkerCrashLoop to fire"
    )
    seconds_to_fire = time.monotonic() - killed
    assert crash_loop["labels"]["reason"] == "crash"
    assert crash_loop["labels"]["instance"] == target
    assert crash_loop["labels"]["severity"] == "warning"
    # The alert's value is increase(), which Prometheus extrapolates to the end of the window: three
    # crashes scraped a few seconds after the first sample can already read 3.7 and fire it (seen here).
    assert float(crash_loop["value"]) > 3
    firing = {a["labels"]["alertname"] for a in alerts(base) if a["state"] == "firing"}
    assert firing == {"GunicornWorkerCrashLoop"}, firing

    server.stop(signal.SIGKILL)
    stopped = time.monotonic()
    (down,) = wait_until(
        lambda: alert(base, "GunicornMetricsTargetDown", "pending"), 30, "GunicornMetricsTargetDown pending"
    )
    seconds_to_pending = time.monotonic() - stopped
    assert down["labels"]["instance"] == target and down["labels"]["severity"] == "critical"
    figures.record(
        faults="4 SIGKILL of workers, then SIGKILL of the master",
        crash_loop_fired_after_s=round(seconds_to_fire, 1),
        target_down_pending_after_s=round(seconds_to_pending, 1),
    )
