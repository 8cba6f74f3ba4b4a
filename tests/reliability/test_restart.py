"""kill -9 of a running server, then a restart on the same ports and directory.

What an orchestrator does to a container that will not stop: SIGKILL. The next start must find its
ports free and its metrics directory usable, and must count from zero (the directory is emptied at start,
so nothing of the killed run is resurrected).
"""

from __future__ import annotations

import os
import signal
import time

import psutil

from tests.support.faults import LEAN, TINY_APP, scrape
from tests.support.server import write_app
from tests.support.waiting import wait_until

#: Seconds within which every process of a killed server must be gone. Issue 8 asks for 2 s, and an idle
#: machine takes well under 1 s (the time taken is recorded in the figures); the bound is wider because a
#: loaded one (the suite runs in parallel on 2 cores) may not schedule the dying processes for a while.
GONE_WITHIN = 10.0


def _same_place(server) -> dict[str, str]:
    keys = ("PORT", "METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR")
    return {key: server.env[key] for key in keys}


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def _everything(server) -> list[int]:
    master = server.master()
    return [master.pid, *(p.pid for p in master.children(recursive=True))]


def test_kill_9_of_the_process_group_then_restart(start_server, app_dir, load, figures):
    """kill -9 of the whole process group under load, then a restart on the same ports.

    `kill -9 -<pgid>` of the master's process group while clients send requests: the master, its workers
    and the metrics side are all gone, within 2 s on an idle machine (the metrics peers run in a group of
    their own and leave with the master), and a new server on the same app port, metrics port and
    directory starts, serves, and counts from zero.
    """
    write_app(app_dir, TINY_APP)
    first = start_server(app_dir, **LEAN)
    first.wait_metrics_ready()
    run = load(first, clients=2)
    wait_until(lambda: run.answered >= 50, 30, "load on the first server")
    processes = _everything(first)
    os.killpg(os.getpgid(first.proc.pid), signal.SIGKILL)
    killed = time.monotonic()
    answered_before_kill = run.answered
    run.stop()  # from here on the clients would only count refused connections
    wait_until(
        lambda: _gone(processes), GONE_WITHIN, "every process of the killed server to end", interval=0.01
    )
    gone_after = time.monotonic() - killed
    second = start_server(app_dir, **_same_place(first), **LEAN)
    second.wait_metrics_ready()
    assert second.get("/").status_code == 200
    final = wait_until(
        lambda: (s := scrape(second)).total("tiny_hits_total") >= 2 and s, 15, "the new server's counts"
    )
    # the readiness probe and the request above; nothing of the first run's requests
    assert final.total("tiny_hits_total") == 2, final.total("tiny_hits_total")
    assert final.total("gunicorn_worker_boots_total") == 2
    figures.record(
        answered=answered_before_kill,
        faults="kill -9 of the process group",
        processes_killed=len(processes),
        all_gone_after_s=round(gone_after, 2),
        restarted_on_same_ports="yes",
    )


def test_kill_9_of_the_master_alone_then_restart(start_server, app_dir, figures):
    """kill -9 of the master alone, then a restart on the same ports.

    Only the master is killed (the OOM killer's choice): its workers must not go on answering on the app
    port, they end (within 2 s on an idle machine), and a new server on the same ports and directory starts.
    """
    write_app(app_dir, TINY_APP)
    first = start_server(app_dir, **LEAN)
    first.wait_metrics_ready()
    processes = _everything(first)
    first.master().kill()
    killed = time.monotonic()
    wait_until(lambda: _gone(processes), GONE_WITHIN, "the workers to end with their master", interval=0.01)
    gone_after = time.monotonic() - killed
    second = start_server(app_dir, **_same_place(first), **LEAN)
    second.wait_metrics_ready()
    assert second.get("/").status_code == 200
    figures.record(
        faults="kill -9 of the master", processes_killed=len(processes), all_gone_after_s=round(gone_after, 2)
    )
