"""Property: with stable worker slots every counter and histogram stays exact and monotonic, and the
number of files is bounded by the most workers held at once, whatever the worker history.

Workers are real forked processes that write through prometheus_client's own MmapedValue code after
``set_identity`` (as gunicorn's post_fork hook would), and die either cleanly or by a real SIGKILL, which
leaves their files exactly as a killed worker does. The test process plays the gunicorn master: it holds
the SlotTable, reaps dead workers (child_exit), clears their live gauges and releases their slots.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import traceback
from collections import defaultdict
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from gunicorn_prometheus import slots
from gunicorn_prometheus.collector import MultiProcessDirCollector
from gunicorn_prometheus.slots import (
    SlotTable,
    clear_slot_live_gauges,
    install_identity,
    set_identity,
    slot_identity,
)

ROUTES = ("/a", "/b", "/c")
BUCKETS = (0.1, 1.0, 10.0)
OBSERVATIONS = (0.05, 0.1, 0.5, 5.0, 50.0)
MAX_HELD = 8  # slots held at once, live or dead-but-unreaped
FILE_TYPES = 3  # counter, histogram, gauge_livesum


@dataclass
class Worker:
    slot: int
    pid: int
    cmd: object  # write end of the command pipe (binary file)
    ack: object  # read end of the acknowledgement pipe
    alive: bool = True
    gauge: float = 0.0


@dataclass
class Truth:
    counter: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    buckets: dict[str, list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0] * (len(BUCKETS) + 1))
    )


def _worker_main(slot: int, cmd_fd: int, ack_fd: int, metrics: tuple[Counter, Histogram, Gauge]) -> None:
    """Child body: take the slot identity, then apply commands until told to exit. Never returns."""
    counter, histogram, gauge = metrics
    code = 0
    try:
        set_identity(slot_identity(slot))
        with os.fdopen(cmd_fd, "rb") as commands:
            for line in commands:
                op, *args = line.decode().split()
                if op == "c":
                    counter.labels(args[0]).inc(int(args[1]))
                elif op == "h":
                    histogram.labels(args[0]).observe(float(args[1]))
                elif op == "g":
                    gauge.inc(float(args[0]))
                elif op == "x":
                    os.write(ack_fd, b"k")
                    break
                os.write(ack_fd, b"k")
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


class SlotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="slots-prop-")
        self._saved_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._saved_value_class = values.ValueClass
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.dir
        # A fresh value class per run: MultiProcessValue caches open files per class.
        values.ValueClass = values.MutexValue
        slots._identity = None
        install_identity()
        set_identity("master")
        # Created in the "master" before forking, as with a preloaded app.
        self.metrics = (
            Counter("reqs", "requests", ["route"], registry=None),
            Histogram("lat", "latency", ["route"], buckets=BUCKETS, registry=None),
            Gauge("inprog", "in progress", multiprocess_mode="livesum", registry=None),
        )
        self.table = SlotTable()
        self.workers: dict[int, Worker] = {}  # held slots -> holder
        self.truth = Truth()
        self.previous: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.max_held = 0
        self.registry = CollectorRegistry()
        MultiProcessDirCollector(self.registry, self.dir)

    # --- master side --------------------------------------------------------------------------------

    def _spawn(self) -> None:
        token = object()
        slot = self.table.acquire(token)  # pre_fork
        cmd_r, cmd_w = os.pipe()
        ack_r, ack_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(cmd_w)
            os.close(ack_r)
            _worker_main(slot, cmd_r, ack_w, self.metrics)
        os.close(cmd_r)
        os.close(ack_w)
        self.workers[slot] = Worker(slot, pid, os.fdopen(cmd_w, "wb", buffering=0), os.fdopen(ack_r, "rb"))
        self.max_held = max(self.max_held, len(self.table))

    def _send(self, worker: Worker, line: str) -> None:
        worker.cmd.write(line.encode() + b"\n")
        assert worker.ack.read(1) == b"k", f"worker {worker.slot} did not acknowledge {line!r}"

    def _alive(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.alive]

    def _pick(self, i: int) -> Worker:
        alive = self._alive()
        return alive[i % len(alive)]

    def _die(self, worker: Worker, hard: bool) -> None:
        if hard:
            os.kill(worker.pid, signal.SIGKILL)
        else:
            self._send(worker, "x")
        worker.cmd.close()
        worker.ack.close()
        worker.alive = False

    def _reap(self, worker: Worker) -> None:
        """child_exit: the holder is gone for good, so its live gauges go and its slot is free."""
        os.waitpid(worker.pid, 0)
        clear_slot_live_gauges(self.dir, worker.slot)
        assert self.table.release(worker.slot)
        del self.workers[worker.slot]

    # --- rules --------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.table) < MAX_HELD)
    @rule()
    def start_worker(self) -> None:
        self._spawn()

    @precondition(lambda self: self._alive())
    @rule(i=st.integers(0, MAX_HELD), route=st.sampled_from(ROUTES), n=st.integers(1, 3))
    def count_requests(self, i: int, route: str, n: int) -> None:
        self._send(self._pick(i), f"c {route} {n}")
        self.truth.counter[route] += n

    @precondition(lambda self: self._alive())
    @rule(i=st.integers(0, MAX_HELD), route=st.sampled_from(ROUTES), value=st.sampled_from(OBSERVATIONS))
    def observe_latency(self, i: int, route: str, value: float) -> None:
        self._send(self._pick(i), f"h {route} {value!r}")
        index = next((k for k, bound in enumerate(BUCKETS) if value <= bound), len(BUCKETS))
        self.truth.buckets[route][index] += 1

    @precondition(lambda self: self._alive())
    @rule(i=st.integers(0, MAX_HELD), delta=st.sampled_from((1, -1)))
    def change_in_progress(self, i: int, delta: int) -> None:
        worker = self._pick(i)
        self._send(worker, f"g {delta}")
        worker.gauge += delta

    @rule(route=st.sampled_from(ROUTES))
    def master_counts(self, route: str) -> None:
        """The master's own metrics live under identity "master" and are never confused with a slot."""
        self.metrics[0].labels(route).inc()
        self.truth.counter[route] += 1

    @precondition(lambda self: self._alive())
    @rule(i=st.integers(0, MAX_HELD), hard=st.booleans())
    def die(self, i: int, hard: bool) -> None:
        self._die(self._pick(i), hard)

    @precondition(lambda self: any(not w.alive for w in self.workers.values()))
    @rule(i=st.integers(0, MAX_HELD))
    def reap_one(self, i: int) -> None:
        dead = [w for w in self.workers.values() if not w.alive]
        self._reap(dead[i % len(dead)])

    @precondition(lambda self: self._alive())
    @rule(hard=st.booleans(), reap_between=st.booleans())
    def reload(self, hard: bool, reap_between: bool) -> None:
        """Graceful reload: new workers start while the old ones are still held, then the old ones go."""
        old = self._alive()
        for _ in range(min(len(old), MAX_HELD - len(self.table))):
            self._spawn()
        for worker in old:
            self._die(worker, hard)
            if reap_between:
                self._reap(worker)
        if not reap_between:
            for worker in old:
                self._reap(worker)

    @rule()
    def scrape(self) -> None:
        self._check()

    def teardown(self) -> None:
        try:
            self._check()
        finally:
            for worker in list(self.workers.values()):
                if worker.alive:
                    os.kill(worker.pid, signal.SIGKILL)
                    worker.cmd.close()
                    worker.ack.close()
                os.waitpid(worker.pid, 0)
            values.ValueClass = self._saved_value_class
            slots._identity = None
            if self._saved_env is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._saved_env
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- the property -------------------------------------------------------------------------------

    def _expect(self, name: str, labels: dict[str, str], expected: float) -> None:
        got = self.registry.get_sample_value(name, labels) or 0.0
        assert got == expected, f"{name}{labels}: scraped {got}, truth {expected}"
        key = (name, tuple(sorted(labels.items())))
        assert got >= self.previous.get(key, 0.0), f"{name}{labels} went backwards"
        self.previous[key] = got

    def _check(self) -> None:
        for route in ROUTES:
            self._expect("reqs_total", {"route": route}, self.truth.counter[route])
            cumulative = 0
            for bound, count in zip((*BUCKETS, float("inf")), self.truth.buckets[route], strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                self._expect("lat_bucket", {"route": route, "le": le}, cumulative)
            self._expect("lat_count", {"route": route}, cumulative)
        # livesum counts every holder whose live gauge file is still there: alive or not yet reaped.
        expected_gauge = sum(w.gauge for w in self.workers.values())
        assert (self.registry.get_sample_value("inprog") or 0.0) == expected_gauge
        names = os.listdir(self.dir)
        # A worker killed while creating a file leaves it under its temporary name (<file>.tmp), which the
        # slot's next holder reuses: at most one per file.
        matches = [re.fullmatch(r".*_([^_]+)\.db(\.tmp)?", n) for n in names]
        assert all(matches), f"unexpected files {names}"
        identities = {m.group(1) for m in matches if m}
        allowed = {"master"} | {slot_identity(s) for s in range(self.max_held)}
        assert identities <= allowed, f"unexpected file identities {identities - allowed}"
        for temporary in (False, True):
            assert sum(bool(m and m.group(2)) is temporary for m in matches) <= FILE_TYPES * (
                self.max_held + 1
            )


TestSlotMachine = SlotMachine.TestCase
TestSlotMachine.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
