"""Small facts the Gunicorn processes leave for the metrics process, as files in the state directory.

The metrics process is a separate program (so that a scrape can never stall the master or a worker); it
learns the master's pid, the desired worker count and which worker holds which slot from here, and reads
everything else (CPU, memory, liveness) from the OS at scrape time. Every write is atomic (rename), so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SERVER_FILE = "server.json"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_server(state: Path, *, master_pid: int, desired_workers: int) -> None:
    """Written by the master at start and whenever the desired worker count changes (TTIN/TTOU)."""
    _write_atomically(
        state / SERVER_FILE, json.dumps({"master_pid": master_pid, "desired_workers": desired_workers})
    )


def read_server(state: Path) -> dict[str, int] | None:
    try:
        return json.loads((state / SERVER_FILE).read_text())
    except (OSError, ValueError):
        return None


def mark_worker(state: Path, slot: int, pid: int, *, serving: bool) -> None:
    """Written by a worker: once forked (booting), then again once its app is loaded and it serves."""
    _write_atomically(state / f"worker-{slot}.json", json.dumps({"pid": pid, "serving": serving}))


def clear_worker(state: Path, slot: int) -> None:
    """Removed by the master when it reaps the slot's worker (child_exit), before the slot is reused."""
    (state / f"worker-{slot}.json").unlink(missing_ok=True)


def workers(state: Path) -> dict[int, dict]:
    """Slot -> {"pid", "serving"} for every worker not yet reaped (it may have died a moment ago)."""
    found: dict[int, dict] = {}
    for path in state.glob("worker-*.json"):
        try:
            found[int(path.name[len("worker-") : -len(".json")])] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return found


def write_exit_reason(state: Path, pid: int, reason: str) -> None:
    """Written by a worker as it exits on its own terms; absent after SIGKILL, which is the point."""
    _write_atomically(state / f"exit-{pid}", reason)


def pop_exit_reason(state: Path, pid: int) -> str | None:
    path = state / f"exit-{pid}"
    try:
        reason = path.read_text()
    except OSError:
        return None
    path.unlink(missing_ok=True)
    return reason
