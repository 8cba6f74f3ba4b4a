"""Small facts the Gunicorn processes leave for the metrics process, by the state directory's path.

A thin layer over :mod:`gunicorn_prometheus.shared_state` (which owns the table's layout) for callers that
think in terms of "the state directory": the master's pid and desired worker count, which worker holds
which slot and whether it serves, and why a worker exited. None of these raise: the table is allocated at
start, and without one (a directory removed, a metrics server started by hand) writes are dropped and
reads find nothing, which costs metrics, never a worker.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from . import shared_state
from .shared_state import MAX_SLOTS, Phase, ServerRecord, Table, WorkerRecord, open_table


def _table(state: Path) -> Table | None:
    return open_table(state.parent)


def write_server(state: Path, *, master_pid: int, desired_workers: int) -> None:
    """Written by the master at start and whenever the desired worker count changes (TTIN/TTOU)."""
    if (table := _table(state)) is not None:
        record = table.server()
        table.write_server(replace(record, master_pid=master_pid, desired_workers=desired_workers))


def read_server(state: Path) -> dict[str, int] | None:
    table = _table(state)
    if table is None:
        return None
    record = table.server()
    if not record.master_pid:
        return None
    return {"master_pid": record.master_pid, "desired_workers": record.desired_workers}


def server_record(state: Path) -> ServerRecord | None:
    table = _table(state)
    return None if table is None else table.server()


def write_errors_total(state: Path) -> int:
    """Failed metric writes of every process so far (for /healthz); 0 without a table."""
    table = _table(state)
    return 0 if table is None else sum(shared_state.write_errors(table).values())


def mark_worker(state: Path, slot: int, pid: int, *, serving: bool) -> None:
    """Written by a worker: once forked (booting), then again once its app is loaded and it serves."""
    table = _table(state)
    if table is None:
        return
    try:
        record = table.worker(slot)
    except IndexError:
        return  # beyond the table's slots: the worker runs, it is just not reported
    phase = Phase.SERVING if serving else Phase.BOOTING
    table.write_worker(slot, WorkerRecord(pid, phase, None, record.write_errors))


def clear_worker(state: Path, slot: int) -> None:
    """Reset by the master when it reaps the slot's worker (child_exit), before the slot is reused."""
    table = _table(state)
    if table is None or slot >= MAX_SLOTS:
        return
    record = table.worker(slot)
    table.write_worker(slot, WorkerRecord(write_errors=record.write_errors))
    table.write_loop_due(slot, 0.0)


def workers(state: Path) -> dict[int, dict]:
    """Slot -> {"pid", "serving", "loop_due"} for every worker not yet reaped (it may have died a moment
    ago); ``loop_due`` is when its event-loop timer is due (``time.monotonic()``), 0.0 when none is armed."""
    table = _table(state)
    if table is None:
        return {}
    found: dict[int, dict] = {}
    for slot in table.used_slots():
        record = table.worker(slot)
        if record.phase != Phase.EMPTY and record.pid > 0:
            serving = record.phase == Phase.SERVING
            found[slot] = {"pid": record.pid, "serving": serving, "loop_due": table.loop_due(slot)}
    return found


def write_exit_reason(state: Path, slot: int, reason: str) -> None:
    """Written by a worker as it exits on its own terms; absent after SIGKILL, which is the point."""
    table = _table(state)
    if table is None or slot >= MAX_SLOTS:
        return
    record = table.worker(slot)
    if record.pid == os.getpid():
        table.write_worker(slot, replace(record, exit_reason=reason))


def pop_exit_reason(state: Path, slot: int, pid: int) -> str | None:
    """The reason the slot's holder `pid` gave on its way out, if it gave one (read by the master)."""
    table = _table(state)
    if table is None or slot >= MAX_SLOTS:
        return None
    record = table.worker(slot)
    return record.exit_reason if record.pid == pid else None
