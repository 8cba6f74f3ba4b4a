"""Metrics storage faults under load: full tmpfs, removed directory, too small at start.

Storage faults must cost metrics, never requests: every request gets its normal answer, no worker dies or
fails to boot, the failure is logged once per process and file (with the path and what to do) and counted
in `gunicorn_metrics_write_errors_total` and /healthz.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

from gunicorn_prometheus import names
from tests.support.faults import LEAN, TINY_APP, Scrape, fill, kill_worker, scrape, wait_replacement_serving
from tests.support.server import write_app
from tests.support.waiting import wait_until

# Counts each request under its own path: every new path is a new label set, so the app's counter file
# must grow while the storage is full. Answers 200 whatever happens to the metric.
PATHS_APP = """
    from prometheus_client import Counter

    HITS = Counter("paths_hits", "Requests the app itself counted, by path.", ["path"])


    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        HITS.labels(scope["path"]).inc()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
"""

WRITE_ERRORS = names.METRICS_WRITE_ERRORS + "_total"
LOGGED = "cannot write metrics to"


def _random_path(rng: random.Random) -> tuple[str, str]:
    # 600 label sets of ~450 bytes (270 KiB) cannot fit in the two workers' first pre-allocated 64 KiB
    # counter files, however the requests are split: a file must grow on the full tmpfs
    return "GET", f"/p/{rng.randrange(10**9)}/" + "x" * 400


def test_full_tmpfs_under_load(start_server, app_dir, small_tmpfs, load, peaks, figures):
    """A full tmpfs under load, and a worker restarted on it.

    The multiprocess directory is a 2 MiB tmpfs; once the server serves, a ballast file takes every free
    page, then 600 requests on 600 new paths make the app's counter grow (new label sets) and one worker
    is killed and must boot again on the full filesystem. All requests are answered 200; no worker dies
    other than the one killed; the write errors are counted and shown in /healthz; each process logs the
    fault once per file.
    """
    write_app(app_dir, PATHS_APP)
    mount = small_tmpfs(2 * 2**20)
    server = start_server(app_dir, PROMETHEUS_MULTIPROC_DIR=str(mount / "metrics"), **LEAN)
    server.wait_metrics_ready()
    wait_until(lambda: server.metrics_get("/healthz").json()["workers_serving"] == 2, 30, "two workers")
    ballast = fill(mount)
    rng = random.Random(1)
    with peaks(server) as peak:
        run = load(server, clients=4, budget=600, request=_random_path, close=False)
        wait_until(lambda: run.answered >= 200, 60, "200 answers on the full tmpfs")
        assert kill_worker(server, rng) is not None
        run.join()
        wait_replacement_serving(server, boots=3)
        after = server.get("/after-restart")
    final = scrape(server)
    health = server.metrics_get("/healthz")
    later = scrape(server)
    assert run.errors <= 4 and set(run.statuses) == {200}, (run.errors, run.statuses)  # 4: cut by the kill
    assert after.status_code == 200
    assert final.total("gunicorn_worker_exits_total") == 1, final.values(
        "gunicorn_worker_exits_total", "reason"
    )
    assert final.total("gunicorn_worker_boots_total") == 3
    errors = final.total(WRITE_ERRORS)
    assert errors >= 1, final.values(WRITE_ERRORS, "process")
    # Writes keep failing while the disk is full (the saturation sampler's, say), so /healthz, read between
    # two scrapes, shows a total between theirs.
    assert health.status_code == 200, health.text
    assert errors <= health.json()["metrics_write_errors"] <= later.total(WRITE_ERRORS), health.text
    logged = [line for line in server.logs().splitlines() if LOGGED in line]
    assert logged and len(logged) == len(set(logged)), logged  # once per process and file
    assert "Traceback" not in server.logs()
    figures.record(
        sent=run.sent,
        answered=run.answered,
        errors=run.errors,
        faults=f"tmpfs full ({ballast // 1024} KiB ballast) + 1 SIGKILL",
        write_errors_counted=int(errors),
        log_lines=len(logged),
        series=final.series(),
        **peak.figures(),
    )


def _counted(final: Scrape, before: Scrape, slot: str) -> tuple[float, float]:
    """Requests counted by label since `before`, and write errors of `slot` since then."""
    by_label = final.total("starlette_requests_total") - before.total("starlette_requests_total")
    errors = final.total(WRITE_ERRORS, process=slot) - before.total(WRITE_ERRORS, process=slot)
    return by_label, errors


def test_a_worker_booted_on_a_full_disk_counts_every_request_then_resumes(
    start_server, app_dir, small_tmpfs, load
):
    """A worker added (TTIN) on a full tmpfs cannot create its HTTP cells file: every request it answers
    is a write error of its slot (none vanishes), no partial file is left for scrapes to count as a read
    error, and once space is freed it counts by label again, without a restart."""
    write_app(app_dir, TINY_APP)
    mount = small_tmpfs(2**20)
    directory = mount / "metrics"
    server = start_server(app_dir, PROMETHEUS_MULTIPROC_DIR=str(directory), **LEAN)
    server.wait_metrics_ready()
    wait_replacement_serving(server, boots=2)
    ballast = mount / "ballast"
    assert fill(mount) > 0
    os.kill(server.master().pid, signal.SIGTTIN)
    wait_replacement_serving(server, boots=3, workers=3)
    before = scrape(server)
    run = load(server, clients=4, budget=300).join()
    by_label, errors = _counted(scrape(server), before, "w2")
    assert set(run.statuses) == {200} and run.answered == 300, (run.errors, run.statuses)
    assert by_label < run.answered and by_label + errors >= run.answered, (by_label, errors)
    assert not (directory / "http_w2.cells").exists()
    assert scrape(server).total(names.METRICS_READ_ERRORS + "_total") == 0
    assert "skipping unreadable" not in server.logs()

    ballast.unlink()
    wait_until(
        lambda: server.get("/").status_code == 200 and (directory / "http_w2.cells").exists(),
        15,
        "the worker on the full disk creating its cells file once there is room",
    )
    before = scrape(server)
    run = load(server, clients=4, budget=300).join()
    by_label, errors = _counted(scrape(server), before, "w2")
    assert run.answered == 300 and (by_label, errors) == (300, 0)
    assert "Traceback" not in server.logs()


#: The HTTP series that count (the in-progress gauge may go down)
HTTP_COUNTERS = ("starlette_requests_total", "starlette_request_duration_seconds_")


def _http_series(scraped: Scrape) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in scraped.samples
        if name.startswith(HTTP_COUNTERS)
    }


def _lowered(before: Scrape, after: Scrape) -> dict[str, tuple[float, float | None]]:
    """HTTP series (by name and labels) that `after` shows lower than `before`, or not at all."""
    now = _http_series(after)
    return {
        f"{name}{dict(labels)}": (value, now.get((name, labels)))
        for (name, labels), value in _http_series(before).items()
        if now.get((name, labels), -1.0) < value
    }


def test_directory_removed_under_load(start_server, app_dir, load, figures):
    """The metrics directory removed under load, and both workers restarted without it.

    `rm -rf` of PROMETHEUS_MULTIPROC_DIR while four clients send requests on new paths, then each worker
    is killed in turn and must boot again, and more requests go to the replacements alone. All requests
    are answered 200, the replacements serve, /metrics still answers, and no HTTP count is lost: every
    HTTP series is at least what it was before the removal (the master holds each slot's cells file
    open, a replacement continues it and the metrics server reads it through the master's descriptor),
    and every request answered is counted by label. (The app's own prometheus_client files are gone with
    the directory: not checked here.)
    """
    write_app(app_dir, PATHS_APP)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    directory = Path(server.env["PROMETHEUS_MULTIPROC_DIR"])
    originals = wait_until(lambda: len(workers := server.workers()) == 2 and workers, 30, "two workers")
    start = scrape(server).total("starlette_requests_total")  # the fixture's readiness probe
    run = load(server, clients=4, budget=400, request=_random_path, close=False)
    wait_until(lambda: run.answered >= 50, 60, "50 answers")
    before = scrape(server)
    # `rm -rf` races with workers creating files in it meanwhile: repeat until the directory is gone
    wait_until(lambda: shutil.rmtree(directory, ignore_errors=True) or not directory.exists(), 10, "rm -rf")
    wait_until(lambda: run.answered >= 200, 60, "200 answers without the directory")
    removed = scrape(server)
    originals[0].send_signal(signal.SIGKILL)
    run.join()
    wait_replacement_serving(server, boots=3)
    originals[1].send_signal(signal.SIGKILL)
    wait_replacement_serving(server, boots=4)
    later = load(server, clients=4, budget=100, request=_random_path).join()  # the replacements' alone
    final = scrape(server)
    answered = run.answered + later.answered
    assert run.errors <= 4 and later.errors == 0, (run.errors, later.errors)
    assert set(run.statuses) == set(later.statuses) == {200}, (run.statuses, later.statuses)
    assert final.total("gunicorn_worker_exits_total", reason="crash") == 2
    assert final.total("gunicorn_worker_boots_total") == 4
    assert before.total("starlette_requests_total") >= 50
    assert _lowered(before, removed) == {} and _lowered(removed, final) == {}
    # Every answered request counted by label (the killed workers' too), the cut ones at most as well
    counted = final.total("starlette_requests_total") - start
    assert answered <= counted <= answered + run.errors, (counted, answered, run.errors)
    assert "Traceback" not in server.logs()
    figures.record(
        sent=run.sent + later.sent,
        answered=answered,
        errors=run.errors,
        faults="directory removed + 2 SIGKILL",
        http_counted=int(counted),
        http_series_lowered=len(_lowered(before, final)),
        write_errors_counted=int(final.total(WRITE_ERRORS)),
        series=final.series(),
    )


def test_peers_replaced_after_rm_rf_keep_the_lifecycle_counts(start_server, app_dir):
    """After an `rm -rf` of PROMETHEUS_MULTIPROC_DIR, both metrics peers are replaced one after the other:
    the port never closes, and the new peers, which never saw the directory, still serve what the master
    counts in the shared table (worker boots and crashes), from the descriptor the master handed down,
    and every HTTP count, from the cells files the master holds (through its descriptors)."""
    write_app(app_dir)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    wait_until(lambda: len(server.metrics_peers()) == 2, 10, "both metrics peers")
    for _ in range(20):
        assert server.get("/").status_code == 200
    before = scrape(server)
    shutil.rmtree(server.env["PROMETHEUS_MULTIPROC_DIR"])
    for old in server.metrics_peers():
        old.kill()
        wait_until(
            lambda old=old: server.metrics_peer_replaced(old), 15, "a replacement for the killed metrics peer"
        )
        assert server.metrics_get("/healthz").status_code == 200
    assert kill_worker(server, random.Random(3)) is not None
    wait_replacement_serving(server, boots=3)
    for _ in range(10):
        assert server.get("/").status_code == 200
    final = scrape(server)
    assert final.total("gunicorn_worker_exits_total", reason="crash") == 1
    assert final.total("gunicorn_worker_boots_total") == 3
    assert before.total("starlette_requests_total") >= 20 and _lowered(before, final) == {}
    added = final.total("starlette_requests_total") - before.total("starlette_requests_total")
    assert added == 10, added


def test_too_small_a_directory_is_refused_at_start(start_server, app_dir, small_tmpfs, figures):
    """A directory too small for the expected files is refused at start, in one line.

    A 256 KiB tmpfs cannot hold the state table and the metric files of two workers and the master: the
    start fails with a non-zero exit, no traceback, and one line naming the variable, the free space and
    what to do.
    """
    write_app(app_dir)
    mount = small_tmpfs(256 * 1024)
    server = start_server(app_dir, wait=None, PROMETHEUS_MULTIPROC_DIR=str(mount / "metrics"), **LEAN)
    logs = server.failed_start_logs()
    lines = [line for line in logs.splitlines() if "PROMETHEUS_MULTIPROC_DIR" in line]
    assert len(lines) == 1 and "KiB free" in lines[0] and "--shm-size" in lines[0], logs
    figures.record(faults="256 KiB tmpfs at start", refused_with=lines[0].split(": ", 1)[-1][:80])
