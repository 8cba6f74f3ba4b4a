"""CPU counters never go down, whatever the order of worker deaths, reaps, restarts and scrapes.

A hypothesis state machine plays the master (forks holders into slots, reaps dead ones and adds their
whole CPU to the slot in the shared state table), the OS (holders burn CPU, die, and are then invisible)
and the metrics server (scrapes, and restarts that forget everything but the table), in any order. Each
scrape must serve values at least as high as the last, and once every dead holder is reaped the served
values must be exactly the CPU spent (no double counting hides behind the clamp).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gunicorn_prometheus import process_stats, shared_state
from gunicorn_prometheus.shared_state import ReapedRecord

# Pids above the kernel's maximum (4,194,304): the OS never knows them, so only the model speaks for them.
FAKE_PID = 10_000_000
SLOTS = 3


class CpuMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        (self.dir / shared_state.STATE_DIR).mkdir()
        shared_state.forget(self.dir)
        self.table = shared_state.create(self.dir)
        self.ledger = process_stats.CpuLedger(self.table)
        self.next_pid = FAKE_PID
        self.holders: dict[int, list] = {}  # slot -> [pid, cpu, alive]
        self.spent: dict[int, int] = {}  # slot -> ticks spent by every holder ever (exact integers)
        self.last: dict[int, float] = {}
        self.last_total = 0.0

    def teardown(self) -> None:
        shared_state.forget(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(slot=st.integers(0, SLOTS - 1))
    def fork(self, slot: int) -> None:
        if slot in self.holders:
            return  # the slot is held until its holder is reaped
        self.next_pid += 1
        self.holders[slot] = [self.next_pid, 0, True]

    @rule(slot=st.integers(0, SLOTS - 1), ticks=st.integers(1, 50))
    def burn(self, slot: int, ticks: int) -> None:
        holder = self.holders.get(slot)
        if holder and holder[2]:
            holder[1] += ticks
            self.spent[slot] = self.spent.get(slot, 0) + ticks

    @rule(slot=st.integers(0, SLOTS - 1), last_ticks=st.integers(0, 20))
    def die(self, slot: int, last_ticks: int) -> None:
        """Dies, having burnt a little more since anyone looked: gone from the OS at once."""
        holder = self.holders.get(slot)
        if holder and holder[2]:
            holder[1] += last_ticks
            self.spent[slot] = self.spent.get(slot, 0) + last_ticks
            holder[2] = False

    @rule(slot=st.integers(0, SLOTS - 1))
    def reap(self, slot: int) -> None:
        """The master's child_exit: the whole life's CPU added in one record with the pid."""
        holder = self.holders.get(slot)
        if holder and not holder[2]:
            before = self.table.reaped(slot)
            cpu = holder[1] / 100
            self.table.write_reaped(slot, ReapedRecord(holder[0], before.cpu_seconds + cpu, before.reaps + 1))
            del self.holders[slot]

    @rule()
    def restart_metrics_server(self) -> None:
        """A new metrics process: nothing in memory, the same table."""
        shared_state.forget(self.dir)
        self.table = shared_state.open_table(self.dir)
        assert self.table is not None
        self.ledger = process_stats.CpuLedger(self.table)

    @rule()
    def scrape(self) -> None:
        holders = {
            slot: (pid, cpu / 100 if alive else None) for slot, (pid, cpu, alive) in self.holders.items()
        }
        served, total = process_stats.worker_cpu(self.ledger, holders)
        for slot, value in served.items():
            assert value >= self.last.get(slot, 0.0), (slot, value, self.last)
            self.last[slot] = value
        assert set(self.last) <= set(served), (self.last, served)
        assert total >= self.last_total, (total, self.last_total)
        self.last_total = total

    @precondition(lambda self: all(alive for _, _, alive in self.holders.values()))
    @invariant()
    def exact_once_settled(self) -> None:
        """With every dead holder reaped, a scrape serves exactly what was spent."""
        holders = {slot: (pid, cpu / 100) for slot, (pid, cpu, _) in self.holders.items()}
        served, total = process_stats.worker_cpu(self.ledger, holders)
        for slot, ticks in self.spent.items():
            assert served.get(slot) == ticks / 100, (slot, served, self.spent)
        assert total == sum(self.spent.values()) / 100, (total, self.spent)
        self.last.update(served)
        self.last_total = total


TestCpuNeverGoesDown = CpuMachine.TestCase
TestCpuNeverGoesDown.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_rounding_to_clock_ticks_removes_float_noise() -> None:
    assert process_stats.round_cpu(0.1 + 0.2 + 0.36) == 0.66
    assert str(process_stats.round_cpu(0.6599999999999999)) == "0.66"


def test_a_scrape_between_death_and_reap_keeps_the_dead_holders_cpu(tmp_path: Path) -> None:
    """The reported bug (3.49 -> 1.94): a scrape after a worker died and before the master added its CPU."""
    (tmp_path / shared_state.STATE_DIR).mkdir()
    table = shared_state.create(tmp_path)
    try:
        ledger = process_stats.CpuLedger(table)
        table.write_reaped(0, ReapedRecord(FAKE_PID, 1.94, 1))
        served, _ = process_stats.worker_cpu(ledger, {0: (FAKE_PID + 1, 1.55)})
        assert served[0] == 3.49
        served, total = process_stats.worker_cpu(ledger, {0: (FAKE_PID + 1, None)})  # died, not reaped
        assert served[0] == 3.49 and total == 3.49
        table.write_reaped(0, ReapedRecord(FAKE_PID + 1, 3.6, 2))  # reaped: its whole life, 1.66 s
        served, total = process_stats.worker_cpu(ledger, {})
        assert served[0] == 3.6 and total == 3.6
    finally:
        shared_state.forget(tmp_path)
