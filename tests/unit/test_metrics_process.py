"""The master's wait for the metrics peers at stop: a zombie is not a running peer."""

from __future__ import annotations

import os
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
