"""Per-process CPU, memory, file descriptors and threads of the master, each worker and the metrics server.

prometheus_client's multiprocess mode cannot report any `process_*` metric: each process would have to
write its own, and nothing would remove a dead one's. Here the metrics process reads them from the OS at
scrape time (psutil), so no worker spends anything on them. Workers are labelled by their stable slot
("w0", "w1", …), never by pid, so series do not grow with every replacement. A slot's CPU counter adds the
CPU of the slot's exited holders (counted by the master at reap time) to the live holder's, so it only
ever goes up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


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
    """Samples of the live workers, from the state directory's slot -> pid table."""
    found = []
    for slot, info in sorted(workers.items()):
        pid = info.get("pid")
        if isinstance(pid, int) and (s := sample(pid, f"w{slot}")) is not None:
            found.append(s)
    return found


def families(
    master_pid: int,
    workers: list[ProcessSample],
    exited_cpu_by_slot: Mapping[str, float],
) -> Iterator[Metric]:
    """The `gunicorn_process_*` families and worker totals, from samples taken at this scrape."""
    samples: list[ProcessSample] = []
    if (master := sample(master_pid, "master")) is not None:
        samples.append(master)
    samples.extend(workers)
    if (me := sample(os.getpid(), "metrics")) is not None:
        samples.append(me)

    label = ["process"]
    cpu = CounterMetricFamily(
        "gunicorn_process_cpu_seconds",
        "CPU time (user + system) per process; a worker slot adds the CPU "
        "of its exited holders, so it never goes down.",
        labels=label,
    )
    rss = GaugeMetricFamily(
        "gunicorn_process_resident_memory_bytes", "Resident memory per process.", labels=label
    )
    fds = GaugeMetricFamily("gunicorn_process_open_fds", "Open file descriptors per process.", labels=label)
    threads = GaugeMetricFamily("gunicorn_process_threads", "Threads per process.", labels=label)
    started = GaugeMetricFamily(
        "gunicorn_process_start_time_seconds",
        "Start time per process, seconds since the epoch.",
        labels=label,
    )
    live_slots = set()
    for s in samples:
        live_slots.add(s.label)
        cpu.add_metric([s.label], s.cpu_seconds + exited_cpu_by_slot.get(s.label, 0.0))
        rss.add_metric([s.label], s.resident_bytes)
        fds.add_metric([s.label], s.open_fds)
        threads.add_metric([s.label], s.threads)
        started.add_metric([s.label], s.start_time)
    for slot, seconds in sorted(exited_cpu_by_slot.items()):
        if slot not in live_slots:  # a slot with no live holder right now keeps its series, and its value
            cpu.add_metric([slot], seconds)
    yield from (cpu, rss, fds, threads, started)

    total_cpu = CounterMetricFamily(
        "gunicorn_workers_cpu_seconds",
        "CPU time of every worker since the server started, exited ones included.",
    )
    total_cpu.add_metric([], sum(s.cpu_seconds for s in workers) + sum(exited_cpu_by_slot.values()))
    total_rss = GaugeMetricFamily(
        "gunicorn_workers_resident_memory_bytes", "Resident memory of all live workers together."
    )
    total_rss.add_metric([], sum(s.resident_bytes for s in workers))
    yield from (total_cpu, total_rss)


def exited_cpu(values: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Fold (slot label, seconds) samples of the master's exited-CPU counter into a dict."""
    result: dict[str, float] = {}
    for slot, seconds in values:
        result[slot] = result.get(slot, 0.0) + seconds
    return result
