"""Per-process CPU, memory, file descriptors and threads of the master, each worker and the metrics server.

prometheus_client's multiprocess mode cannot report any `process_*` metric: each process would have to
write its own, and nothing would remove a dead one's. Here the metrics process reads them from the OS at
scrape time (psutil), so no worker spends anything on them. Workers are labelled by their stable slot
("w0", "w1", …), never by pid, so series do not grow with every replacement.

CPU counters never go down, by construction. A slot's CPU is the CPU of its reaped holders (added by the
master at reap time, in the shared state table) plus its live holder's. Between a holder's death and the
master's reap-time figure there is a window in which neither the OS nor the master has that holder's CPU,
and a scrape there used to serve a drop (3.49 -> 1.94 s). Every value computed is a lower bound of the
slot's true total, so the metrics server serves the highest value it has computed for the slot so far,
kept in the table (a restart of the metrics server forgets nothing): across the window it serves the last
value it saw, and once the master's figure (the holder's whole life) is in, the exact one again. Values
are rounded to the clock's resolution (the kernel counts CPU in ticks), so sums show no float noise such
as 0.6599999999999999.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import names
from .shared_state import (
    MASTER_LABEL,
    MAX_SLOTS,
    METRICS_LABEL,
    METRICS_SIDE_PROCESSES,
    LedgerRecord,
    MetricsSideRecord,
    Table,
    slot_name,
    write_errors,
)

try:
    _TICKS = os.sysconf("SC_CLK_TCK")  # the resolution of /proc's CPU times (100 per second on Linux)
except (AttributeError, ValueError, OSError):
    _TICKS = 100


def round_cpu(seconds: float) -> float:
    """`seconds` to the clock's resolution (round() is monotonic, so counters stay so)."""
    return round(seconds * _TICKS) / _TICKS


@dataclass(frozen=True)
class ProcessSample:
    label: str
    cpu_seconds: float
    resident_bytes: int
    open_fds: int
    threads: int
    start_time: float


def sample(pid: int, label: str) -> ProcessSample | None:
    """One process's figures, or None if it is gone (or a zombie) by now."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            cpu = proc.cpu_times()
            return ProcessSample(
                label=label,
                cpu_seconds=cpu.user + cpu.system,
                resident_bytes=proc.memory_info().rss,
                open_fds=proc.num_fds(),
                threads=proc.num_threads(),
                start_time=proc.create_time(),
            )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def worker_samples(workers: Mapping[int, Mapping[str, object]]) -> list[ProcessSample]:
    """Samples of the live workers, from the state table's slot -> pid map."""
    found = []
    for slot, info in sorted(workers.items()):
        pid = info.get("pid")
        if isinstance(pid, int) and (s := sample(pid, slot_name(slot))) is not None:
            found.append(s)
    return found


class CpuLedger:
    """The served CPU counters of the worker slots and the metrics server, kept in the state table."""

    def __init__(self, table: Table | None) -> None:
        self.table = table
        self._lock = threading.Lock()  # concurrent scrapes update the same records
        self._memory: dict[int, float] = {}  # served per slot, when there is no table to keep it in

    def slot(self, slot: int, holder_pid: int, live_cpu: float | None) -> float:
        """CPU of every holder the slot ever had, as far as known now; never less than served before."""
        table = self.table
        if table is None or not 0 <= slot < MAX_SLOTS:
            value = round_cpu(live_cpu or 0.0)
            with self._lock:
                served = self._memory[slot] = max(self._memory.get(slot, 0.0), value)
            return served
        with self._lock, table.metrics_side_lock():
            reaped, ledger = table.reaped(slot), table.ledger(slot)
            value = reaped.cpu_seconds
            if holder_pid and holder_pid != reaped.last_pid and live_cpu is not None:
                value += live_cpu  # a live holder not yet reaped: its CPU is not in the master's figure
            served = max(ledger.served_cpu, round_cpu(value))
            if served != ledger.served_cpu:
                table.write_ledger(slot, LedgerRecord(served))
            return served

    def served_slots(self) -> dict[int, float]:
        """Every slot served so far with its last value (slots without a live holder keep their series)."""
        if self.table is None:
            with self._lock:
                return {slot: value for slot, value in self._memory.items() if slot >= 0}
        found = {}
        for slot in self.table.used_slots():
            found[slot] = self.table.ledger(slot).served_cpu
        return found

    def total(self, value: float) -> float:
        """The workers' total: a sum of non-decreasing values, clamped too, for concurrent scrapes."""
        value = round_cpu(value)
        if self.table is None:
            with self._lock:
                served = self._memory[-1] = max(self._memory.get(-1, 0.0), value)
            return served
        with self._lock, self.table.metrics_side_lock():
            record = self.table.metrics_side()
            served = max(record.workers_served, value)
            self.table.write_metrics_side(replace(record, workers_served=served))
            return served

    def metrics_side(self, pid: int, cpu: float) -> float:
        """CPU of every metrics-side process ever (both peers, and those they replaced), never less.

        Each process that serves records its own CPU; the others' are read from the OS, and a process
        that is gone has its last recorded CPU folded into the ended total.
        """
        if self.table is None:
            return round_cpu(cpu)
        with self._lock, self.table.metrics_side_lock():
            record = self.table.metrics_side()
            ended, procs = record.ended_cpu, dict(record.processes)
            for other, seen in list(procs.items()):
                if other == pid:
                    continue
                now = _live_cpu(other)
                if now is None:
                    ended += seen
                    del procs[other]
                else:
                    procs[other] = max(seen, now)
            procs[pid] = max(cpu, procs.get(pid, 0.0))
            while len(procs) > METRICS_SIDE_PROCESSES:  # cannot happen with two peers; never lose CPU
                oldest = next(iter(procs))
                ended += procs.pop(oldest)
            served = max(record.metrics_served, round_cpu(ended + sum(procs.values())))
            self.table.write_metrics_side(
                MetricsSideRecord(record.workers_served, served, ended, tuple(procs.items()))
            )
            return served


def _live_cpu(pid: int) -> float | None:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cpu = proc.cpu_times()
        return cpu.user + cpu.system
    except psutil.Error:
        return None


def worker_cpu(
    ledger: CpuLedger, holders: Mapping[int, tuple[int, float | None]]
) -> tuple[dict[int, float], float]:
    """The CPU to serve per worker slot, and all workers' total, at one scrape.

    `holders` maps each slot with a holder on record to (its pid, its CPU now, or None when the OS no
    longer shows it). Slots served before but without a holder now are included.
    """
    served = {slot: ledger.slot(slot, pid, cpu) for slot, (pid, cpu) in holders.items()}
    for slot in ledger.served_slots():
        if slot not in served:
            served[slot] = ledger.slot(slot, 0, None)
    return served, ledger.total(sum(served.values()))


def families(
    master_pid: int, workers: Mapping[int, Mapping[str, object]], ledger: CpuLedger
) -> Iterator[Metric]:
    """The `gunicorn_process_*` families, worker totals and write errors, from this scrape's samples."""
    label = ["process"]
    cpu = CounterMetricFamily(
        names.PROCESS_CPU,
        "CPU time (user + system) per process; a worker slot adds the CPU "
        "of its exited holders, so it never goes down.",
        labels=label,
    )
    rss = GaugeMetricFamily(names.PROCESS_RSS, "Resident memory per process.", labels=label)
    fds = GaugeMetricFamily(names.PROCESS_FDS, "Open file descriptors per process.", labels=label)
    threads = GaugeMetricFamily(names.PROCESS_THREADS, "Threads per process.", labels=label)
    started = GaugeMetricFamily(
        names.PROCESS_START, "Start time per process, seconds since the epoch.", labels=label
    )

    def add(s: ProcessSample, cpu_seconds: float) -> None:
        cpu.add_metric([s.label], cpu_seconds)
        rss.add_metric([s.label], s.resident_bytes)
        fds.add_metric([s.label], s.open_fds)
        threads.add_metric([s.label], s.threads)
        started.add_metric([s.label], s.start_time)

    if (master := sample(master_pid, MASTER_LABEL)) is not None:
        add(master, round_cpu(master.cpu_seconds))
    live: dict[int, ProcessSample] = {}
    holders: dict[int, tuple[int, float | None]] = {}
    for slot, info in sorted(workers.items()):
        pid = info.get("pid")
        if isinstance(pid, int):
            if (s := sample(pid, slot_name(slot))) is not None:
                live[slot] = s
            holders[slot] = (pid, None if s is None else s.cpu_seconds)
    served, workers_total = worker_cpu(ledger, holders)
    for slot, s in live.items():
        add(s, served[slot])
    if (me := sample(os.getpid(), METRICS_LABEL)) is not None:
        add(me, ledger.metrics_side(os.getpid(), me.cpu_seconds))
    for slot in sorted(served.keys() - live.keys()):
        # No live holder right now: the slot keeps its series and its value (reaped holders, or the last
        # seen one not reaped yet) until a successor holds it.
        cpu.add_metric([slot_name(slot)], served[slot])
    yield from (cpu, rss, fds, threads, started)

    total_cpu = CounterMetricFamily(
        names.WORKERS_CPU, "CPU time of every worker since the server started, exited ones included."
    )
    total_cpu.add_metric([], workers_total)
    total_rss = GaugeMetricFamily(names.WORKERS_RSS, "Resident memory of all live workers together.")
    total_rss.add_metric([], sum(s.resident_bytes for s in live.values()))
    yield from (total_cpu, total_rss)

    if ledger.table is not None:
        errors = CounterMetricFamily(
            names.METRICS_WRITE_ERRORS,
            "Metric writes that failed (storage full, directory unwritable or removed), by process; the "
            "requests were served, only their metrics are missing.",
            labels=label,
        )
        for process, count in write_errors(ledger.table).items():
            errors.add_metric([process], count)
        yield errors
