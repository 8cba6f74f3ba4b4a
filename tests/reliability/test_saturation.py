"""Saturation figures through worker kills: lag counts never go down, a dead worker's gauges leave with it."""

from __future__ import annotations

import random

from gunicorn_prometheus import names, server_state
from gunicorn_prometheus.multiproc_dir import state_dir
from tests.support.faults import LEAN, TINY_APP, kill_worker, scrape
from tests.support.server import write_app
from tests.support.waiting import wait_until

LAG_COUNT = names.EVENT_LOOP_LAG + "_count"


def test_saturation_figures_through_sigkill_churn(start_server, app_dir, load, figures):
    """Saturation figures through SIGKILL churn under load.

    Two workers under four clients; one worker at a time is killed with SIGKILL as soon as its
    replacement serves, six times. Each slot's event-loop lag count never goes down from one scrape to the
    next (the replacement continues its predecessor's histogram), every scrape answers, and the live
    gauges (worst lag, thread pool) are those of the workers alive: one series per serving slot.
    """
    write_app(app_dir, TINY_APP)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    directory = state_dir(server.env["PROMETHEUS_MULTIPROC_DIR"])
    kills = 6
    rng = random.Random(11)
    last_counts: dict[str, float] = {}
    scrapes = 0

    def check_monotonic() -> dict[str, float]:
        nonlocal scrapes
        counts = scrape(server).values(LAG_COUNT, "process")
        scrapes += 1
        for process, count in counts.items():
            assert count >= last_counts.get(process, 0.0), (process, count, last_counts)
        last_counts.update(counts)
        return counts

    def settled() -> bool:
        """Both slots serve, and the live gauges are exactly theirs, each sampled since it started."""
        serving = {
            f"w{slot}" for slot, info in server_state.workers(directory).items() if info.get("serving")
        }
        now = scrape(server)
        check_monotonic()
        return len(serving) == 2 and set(now.values(names.EVENT_LOOP_LAG_MAX, "process")) == serving

    run = load(server, clients=4)
    for _ in range(kills):
        before = run.answered
        wait_until(
            lambda before=before: run.answered > before and settled(), 30, "both slots serving, sampled"
        )
        assert kill_worker(server, rng) is not None
        for _ in range(3):
            check_monotonic()  # scrapes during the churn: every one answers, no count goes down
    wait_until(settled, 30, "the last replacement sampled")
    run.stop()
    final = check_monotonic()
    assert set(final) == {"w0", "w1"}, final  # slots reused: no series per replaced worker
    assert set(run.statuses) == {200}, run.statuses
    figures.record(
        answered=run.answered,
        errors=run.errors,
        faults=f"{kills} SIGKILL",
        scrapes=scrapes,
        lag_samples=int(sum(final.values())),
    )
