"""The slot facts the workers and the master leave for the metrics server, on a real mapped table."""

from __future__ import annotations

import errno
from pathlib import Path

from gunicorn_prometheus import server_state, shared_state
from gunicorn_prometheus.multiproc_dir import state_dir
from gunicorn_prometheus.shared_state import HeldCellsRecord, LedgerRecord, ReapedRecord


def test_a_workers_loop_due_time_is_reported_and_cleared_when_it_is_reaped(tmp_path: Path) -> None:
    (tmp_path / shared_state.STATE_DIR).mkdir()
    shared_state.forget(tmp_path)
    table = shared_state.create(tmp_path)
    state = state_dir(str(tmp_path))
    try:
        server_state.mark_worker(state, 3, 4242, serving=True)
        table.write_reaped(3, ReapedRecord(last_pid=7, cpu_seconds=1.5, reaps=1))
        table.write_ledger(3, LedgerRecord(served_cpu=2.5))
        table.write_loop_due(3, 1234.5)  # by the worker's loop monitor, 10 times a second
        assert server_state.workers(state) == {3: {"pid": 4242, "serving": True, "loop_due": 1234.5}}
        # Its own place in the slot: the other parts keep their values.
        assert table.reaped(3) == ReapedRecord(7, 1.5, 1) and table.ledger(3) == LedgerRecord(2.5)
        assert table.loop_due(2) == table.loop_due(4) == 0.0

        server_state.clear_worker(state, 3)  # the master reaped it: a stale due time is no stall
        assert table.loop_due(3) == 0.0 and server_state.workers(state) == {}
    finally:
        shared_state.forget(tmp_path)


def test_the_held_cells_file_of_a_slot_has_its_own_place_and_outlives_a_reap(tmp_path: Path) -> None:
    (tmp_path / shared_state.STATE_DIR).mkdir()
    shared_state.forget(tmp_path)
    table = shared_state.create(tmp_path)
    state = state_dir(str(tmp_path))
    try:
        assert table.all_held_cells() == {} and table.held_cells(5) == HeldCellsRecord(fd=-1)
        table.write_loop_due(5, 99.0)
        table.write_ledger(5, LedgerRecord(served_cpu=1.0))
        table.write_held_cells(5, HeldCellsRecord(fd=0, inode=2**40 + 7))  # 0 is a descriptor too
        table.write_held_cells(shared_state.MAX_SLOTS - 1, HeldCellsRecord(fd=1234, inode=9))
        assert table.all_held_cells() == {
            5: HeldCellsRecord(0, 7),  # the inode's low 32 bits
            shared_state.MAX_SLOTS - 1: HeldCellsRecord(1234, 9),
        }
        assert table.loop_due(5) == 99.0 and table.ledger(5) == LedgerRecord(1.0)
        server_state.mark_worker(state, 5, 4242, serving=True)
        server_state.clear_worker(state, 5)  # reaped: the slot's next worker continues the same file
        assert table.held_cells(5) == HeldCellsRecord(0, 7)
    finally:
        shared_state.forget(tmp_path)


def test_a_write_error_says_what_to_do_for_its_cause(tmp_path: Path, capsys):
    """A full disk asks for room; a removed directory says it comes back (more room would not help)."""
    shared_state.record_write_error(tmp_path / "full.db", OSError(errno.ENOSPC, "No space left on device"))
    full = capsys.readouterr().err
    shared_state.record_write_error(tmp_path / "gone.db", FileNotFoundError(errno.ENOENT, "No such file"))
    gone = capsys.readouterr().err
    assert "more space" in full and "was removed" not in full
    assert "was removed: the master creates it again" in gone and "more space" not in gone
