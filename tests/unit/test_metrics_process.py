"""The master's side of the metrics peers: its wait for them at stop (a zombie is not a running peer), and
its restart of a pair when none is left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from gunicorn_prometheus import metrics_process
from tests.support.waiting import wait_until


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_running_member_keeps_the_group_running() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert metrics_process._group_running(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_zombie_member_does_not_and_is_reaped_by_its_parent() -> None:
    # Left unreaped, as the second peer is when it is reparented to a master that is PID 1.
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    wait_until(lambda: _state(child.pid) == "Z", 10, "the child to exit unreaped")
    os.killpg(child.pid, 0)  # what the old check saw: the group still "exists"
    assert not metrics_process._group_running(child.pid)
    assert not Path(f"/proc/{child.pid}").exists()  # reaped on the way, by us, its parent
    child.returncode = 0  # already reaped: keep Popen from waiting for it again


def _crashing_peer(**handoff: int | None) -> subprocess.Popen:
    """A "peer" that holds the lifeline like a real one and exits at once, as one failing at start-up."""
    lifeline = handoff["lifeline_fd"]
    assert lifeline is not None
    return subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"], pass_fds=(lifeline,))


def test_the_master_restarts_a_pair_that_keeps_dying_with_a_growing_back_off(
    tmp_path: Path, monkeypatch, capfd
) -> None:
    """No peer left: the master starts a new pair, and one that lived under STABLE_AFTER is followed by a
    back-off that doubles (0.25 s, 0.5 s, 1 s, ...), one line each time; stop ends the supervision."""
    monkeypatch.setattr(metrics_process, "spawn_peer", _crashing_peer)
    saved = {s: signal.getsignal(s) for s in (signal.SIGIO, signal.SIGALRM)}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    side = metrics_process.start(sock, master_pid=os.getpid(), directory=str(tmp_path))
    try:
        logged: list[str] = []

        def lines() -> list[str]:
            logged.extend(line for line in capfd.readouterr().err.splitlines() if "no metrics server" in line)
            return logged

        wait_until(lambda: len(lines()) >= 3, 10, "three restarts")
        assert [line.rsplit(" in ", 1)[-1] for line in logged[:3]] == ["0.25 s", "0.5 s", "1 s"], logged
    finally:
        metrics_process.stop(side)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert sock.fileno() == -1  # the master's copy is closed: the port is free
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
