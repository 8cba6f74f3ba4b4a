"""A cardinality attack: 20,000 requests with random paths, methods and query strings.

Scanners and fuzzers send every path and method there is; each new label value would be a new series in
every scrape and a new entry in every worker's files, forever. Series, memory and the metrics directory
must stay bounded, and every answered request must still be counted.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import psutil

from tests.support.faults import scrape
from tests.support.server import write_app
from tests.support.waiting import wait_until

KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
PATH_LABELS = {"/", "/items/{item_id}", "__unknown__"}
COUNT = "starlette_request_duration_seconds_count"


def _attack(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.3:
        method = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=rng.randint(3, 12)))  # junk tokens
    else:
        method = rng.choice(KNOWN_METHODS)
    kind = rng.random()
    if kind < 0.2:
        path = "/"
    elif kind < 0.5:
        path = f"/items/{rng.randrange(10**12)}?q={rng.randrange(10**9)}"
    else:
        path = f"/{rng.randrange(16**8):x}/{rng.randrange(10**9)}/" + "a" * rng.randint(0, 80)
    return method, path


def _junk(method: str, path: str, status: int) -> tuple[bool, int]:
    return method not in KNOWN_METHODS, status


def _dir_bytes(directory: Path) -> int:
    total = 0
    for root, _, names in os.walk(directory):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def _rss(processes: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in processes if p.is_running())


def test_cardinality_attack_stays_bounded(start_server, app_dir, load, figures):
    """A 20,000-request cardinality attack.

    Four keep-alive clients send 20,000 requests to the Quick Start app with random paths (a third of them
    matching `/items/{item_id}` with random ids and query strings), random methods and junk method
    tokens. Every answered request is counted; the series carry only the route templates and known
    methods (`__unknown__`, `_OTHER` for the rest); between the first 2,000 requests and the end, the
    workers' and the metrics server's memory and the metrics directory do not grow beyond small bounds.
    """
    write_app(app_dir)
    server = start_server(app_dir, WEB_CONCURRENCY="2", LOG_LEVEL="warning", ACCESS_LOG="")
    server.wait_metrics_ready()
    directory = Path(server.env["PROMETHEUS_MULTIPROC_DIR"])
    before = scrape(server).total(COUNT)
    total, warmup = 20_000, 2_000
    run = load(server, clients=4, budget=total, request=_attack, close=False, deadline=150, classify=_junk)
    wait_until(lambda: run.answered + run.errors >= warmup, 60, f"{warmup} requests")
    watched = [*server.workers(), *server.metrics_peers()]
    warm_rss, warm_dir = _rss(watched), _dir_bytes(directory)
    run.join()
    # Uvicorn's parser answers 400 to a method it does not know before any app sees the request: those
    # are not the app's requests and are not counted. Every other answer is.
    expected = run.answered - run.classes[True, 400]
    final = wait_until(
        lambda: (s := scrape(server)).total(COUNT) - before >= expected and s,
        15,
        "every answered request counted",
        details=lambda: f"{scrape(server).total(COUNT) - before} counted of {expected}: {run.classes}",
    )
    end_rss, end_dir = _rss(watched), _dir_bytes(directory)

    assert run.errors == 0 and run.sent == total, (run.errors, run.sent)
    assert final.total(COUNT) - before == expected  # exact: nothing lost, nothing invented
    assert run.classes[True, 400] > 0 and run.classes[False, 400] == 0, run.classes
    labels = [lab for name, lab, _ in final.samples if name == COUNT]
    assert {lab["path"] for lab in labels} <= PATH_LABELS, {lab["path"] for lab in labels}
    assert {lab["method"] for lab in labels} <= {*KNOWN_METHODS, "_OTHER"}
    statuses = {lab["status_code"] for lab in labels}
    bound = len(PATH_LABELS) * (len(KNOWN_METHODS) + 1) * len(statuses)
    assert len(labels) <= bound, (len(labels), bound)

    # every label set carries the same samples (buckets, sum, count, the derived total): no other
    # starlette series exists beside them
    def same_set(lab: dict[str, str]) -> bool:
        return {k: v for k, v in lab.items() if k != "le"} == labels[0]

    per_set = sum(1 for name, lab, _ in final.samples if name.startswith("starlette_") and same_set(lab))
    http_series = final.series("starlette_request_duration") + final.series("starlette_requests_total")
    assert http_series == len(labels) * per_set, (http_series, len(labels), per_set)
    assert final.series("starlette_requests_in_progress") <= len(KNOWN_METHODS) + 1
    grown_mb = (end_rss - warm_rss) / 2**20
    assert grown_mb < 24, f"workers and metrics server grew by {grown_mb:.1f} MiB after the warm-up"
    assert end_dir - warm_dir <= 64 * 1024, (warm_dir, end_dir)
    figures.record(
        sent=run.sent,
        answered=run.answered,
        counted=f"{int(final.total(COUNT) - before)} (+{run.classes[True, 400]} junk methods answered 400 "
        "by Uvicorn's parser, never reaching the app)",
        errors=run.errors,
        faults=f"{total} random paths/methods",
        series=final.series(),
        http_series=len(labels),
        memory_growth_after_warmup_mb=round(grown_mb, 1),
        dir_kb=round(end_dir / 1024),
        dir_growth_after_warmup_kb=round((end_dir - warm_dir) / 1024),
    )
