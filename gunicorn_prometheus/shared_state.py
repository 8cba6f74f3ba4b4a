"""The on-disk contract between the master, the workers and the metrics server: one pre-allocated table.

The metrics server is a separate program (a scrape must never stall the master or a worker), so what only
the Gunicorn processes know reaches it through the multiprocess directory: the master's pid and desired
worker count, which pid holds which worker slot and whether it serves yet, why a worker exited, the
lifecycle counters, the CPU of reaped workers, and how many metric writes failed. All of it lives in ONE
file of fixed size, ``.state/table``, that the master creates and fully allocates (``posix_fallocate``)
at start-up, before any worker exists:

- Nothing is ever allocated afterwards, so a full disk cannot fail a write here, and no page of the
  mapping is unbacked (a write into an unbacked page of a full tmpfs is SIGBUS, not an error).
- Workers inherit the master's shared mapping across fork: they open nothing, so a removed or unwritable
  directory does not stop them either.
- Every record has exactly one writing process at a time (the master, or the slot's live worker), or
  is written under a lock (the metrics side's records: two metrics-server peers serve at once), and has
  a sequence number (a seqlock: odd while a write is under way), so a reader never mixes two versions of
  a record without locks between processes. A writer killed mid-write leaves an odd number; the next
  writer of that record starts over from the next even one.

Layout (little-endian, 8-byte fields): a 256-byte header with the master's record and the metrics
side's own (CPU totals it served, its processes' CPU), then ``MAX_SLOTS`` slot records of 128 bytes: the
worker's part (pid, phase, exit reason, write errors), the master's part (pid of the last reaped holder,
the CPU of all reaped holders, reaps), the metrics side's part (the slot's CPU it last served), the
worker's event-loop timer (when its next sample is due, on CLOCK_MONOTONIC, which every process of the
machine reads alike: the metrics server derives a stall in progress from it at scrape time) and the
master's second part: which descriptor of the master holds the slot's HTTP cells file open (plus one:
zero is none) and the low 32 bits of its inode, so the metrics server reads the file through
``/proc/<master pid>/fd/`` even once its name is gone. A master of an older version leaves it zero.
This module owns the layout, the slot names (``w<slot>``) and the exit reasons; nothing else formats them.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import mmap
import os
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

STATE_DIR = ".state"
TABLE_FILE = "table"
MAGIC = b"GPSTATE1"

#: Slots the table has room for: the most workers alive at once, old and new ones overlapping during a
#: graceful reload included. A slot beyond it still works; only its state goes unreported.
MAX_SLOTS = 512

EXIT_REASONS = ("clean", "max_requests", "timeout", "crash")
MASTER_LABEL = "master"
METRICS_LABEL = "metrics"


def slot_name(slot: int) -> str:
    """A worker slot's name: ``"w<slot>"``, its metric files' identity and its ``process`` label."""
    if slot < 0:
        raise ValueError(f"slot must be >= 0, got {slot}")
    return f"w{slot}"


class Phase(enum.IntEnum):
    EMPTY = 0  # no holder (never held, or its holder was reaped)
    BOOTING = 1  # forked, loading the app
    SERVING = 2  # app loaded, serving requests


# Records: (offset of the seqlock word, struct of the fields after it).
_HEADER_SIZE = 256
_SLOT_SIZE = 128
_MASTER = (8, struct.Struct("<qqq4qq"))  # master_pid, desired, boots, exits x4, write_errors
# workers' CPU served, metrics side's CPU served, CPU of its ended processes, then (pid, CPU) of its live ones
_METRICS = (128, struct.Struct("<ddd" + "qd" * 4))
METRICS_SIDE_PROCESSES = 4  # two peers serve at once; room for replacements before the dead are folded
_WORKER = (0, struct.Struct("<qqqq"))  # pid, phase, exit reason (index + 1, 0: none), write_errors
_REAPED = (48, struct.Struct("<qdq"))  # last reaped pid, CPU of reaped holders, reaps
_LEDGER = (80, struct.Struct("<d"))  # CPU served for the slot
_LOOP = (96, struct.Struct("<d"))  # when the worker's loop timer is due (time.monotonic()), 0: none armed
_CELLS = (112, struct.Struct("<iI"))  # the master's descriptor of the slot's HTTP cells file, inode & 2**32-1
_SEQ = struct.Struct("<Q")
TABLE_SIZE = _HEADER_SIZE + MAX_SLOTS * _SLOT_SIZE

assert len(MAGIC) <= _MASTER[0] and _MASTER[0] + 8 + _MASTER[1].size <= _METRICS[0]
assert _METRICS[0] + 8 + _METRICS[1].size <= _HEADER_SIZE
assert _WORKER[0] + 8 + _WORKER[1].size <= _REAPED[0]
assert _REAPED[0] + 8 + _REAPED[1].size <= _LEDGER[0]
assert _LEDGER[0] + 8 + _LEDGER[1].size <= _LOOP[0]
assert _LOOP[0] + 8 + _LOOP[1].size <= _CELLS[0]
assert _CELLS[0] + 8 + _CELLS[1].size <= _SLOT_SIZE


@dataclass(frozen=True)
class ServerRecord:
    """The master's record: written by the master only."""

    master_pid: int = 0
    desired_workers: int = 0
    boots: int = 0
    exits: tuple[int, int, int, int] = (0, 0, 0, 0)  # by EXIT_REASONS
    write_errors: int = 0

    def exits_by_reason(self) -> dict[str, int]:
        return dict(zip(EXIT_REASONS, self.exits, strict=True))


@dataclass(frozen=True)
class WorkerRecord:
    """A slot's worker part: written by the slot's live holder, and reset by the master once reaped."""

    pid: int = 0
    phase: Phase = Phase.EMPTY
    exit_reason: str | None = None
    write_errors: int = 0  # all holders of the slot together: a successor continues the count


@dataclass(frozen=True)
class ReapedRecord:
    """A slot's master part: the holders the master reaped, and their CPU time, all together."""

    last_pid: int = 0
    cpu_seconds: float = 0.0
    reaps: int = 0


@dataclass(frozen=True)
class LedgerRecord:
    """A slot's metrics-server part: the CPU it last served, so a restart of it forgets nothing."""

    served_cpu: float = 0.0


@dataclass(frozen=True)
class HeldCellsRecord:
    """A slot's HTTP cells file as the master holds it open (see :mod:`gunicorn_prometheus.cells`):
    ``/proc/<master pid>/fd/<fd>``, whose inode's low 32 bits are ``inode`` (the slot has room for 8
    bytes; a reader checks them, and the file's header, before trusting it). fd -1: none held."""

    fd: int = -1
    inode: int = 0


@dataclass(frozen=True)
class MetricsSideRecord:
    """The metrics side's own record (written under `Table.metrics_side_lock`): the CPU totals it served
    last, so no restart of it serves less, and its processes' CPU (ended ones folded into `ended_cpu`)."""

    workers_served: float = 0.0
    metrics_served: float = 0.0
    ended_cpu: float = 0.0
    processes: tuple[tuple[int, float], ...] = ()


class Table:
    """The mapped table. Methods never raise OSError: the mapping is allocated, reading it cannot fail."""

    def __init__(self, path: Path, memory: mmap.mmap) -> None:
        self.path = path
        self._m = memory
        self._lock_fd: int | None = None
        # Threads of one process (a worker's thread pool counting write errors, its main thread marking
        # it serving) take turns; between processes each record has a single writer.
        self._lock = threading.Lock()

    # --- the seqlock -------------------------------------------------------------------------------

    def _write(self, offset: int, fields: struct.Struct, *values: object) -> None:
        data = fields.pack(*values)
        with self._lock:
            seq = _SEQ.unpack_from(self._m, offset)[0]
            seq += 1 if seq % 2 == 0 else 2  # odd: a write is under way (left over: a killed writer)
            # Slice assignment, not pack_into: prometheus_client's mmap_dict notes that pack_into can
            # expose a transient zero to a concurrent reader.
            self._m[offset : offset + 8] = _SEQ.pack(seq)
            self._m[offset + 8 : offset + 8 + fields.size] = data
            self._m[offset : offset + 8] = _SEQ.pack(seq + 1)

    def _read(self, offset: int, fields: struct.Struct) -> tuple:
        for _ in range(1000):
            before = _SEQ.unpack_from(self._m, offset)[0]
            data = self._m[offset + 8 : offset + 8 + fields.size]
            if before % 2 == 0 and _SEQ.unpack_from(self._m, offset)[0] == before:
                return fields.unpack(data)
        return fields.unpack(data)  # a writer died mid-write: its record is as good as it gets

    @staticmethod
    def _slot_offset(slot: int, part: tuple[int, struct.Struct]) -> int:
        if not 0 <= slot < MAX_SLOTS:
            raise IndexError(slot)
        return _HEADER_SIZE + slot * _SLOT_SIZE + part[0]

    # --- the master's record ----------------------------------------------------------------------

    def server(self) -> ServerRecord:
        pid, desired, boots, *exits, errors = self._read(*_MASTER)
        return ServerRecord(pid, desired, boots, tuple(exits), errors)

    def write_server(self, record: ServerRecord) -> None:
        r = record
        self._write(*_MASTER, r.master_pid, r.desired_workers, r.boots, *r.exits, r.write_errors)

    # --- slots ----------------------------------------------------------------------------------------

    def worker(self, slot: int) -> WorkerRecord:
        pid, phase, reason, errors = self._read(self._slot_offset(slot, _WORKER), _WORKER[1])
        named = EXIT_REASONS[reason - 1] if 0 < reason <= len(EXIT_REASONS) else None
        known = phase in Phase._value2member_map_
        return WorkerRecord(pid, Phase(phase) if known else Phase.EMPTY, named, errors)

    def write_worker(self, slot: int, record: WorkerRecord) -> None:
        reason = EXIT_REASONS.index(record.exit_reason) + 1 if record.exit_reason in EXIT_REASONS else 0
        offset = self._slot_offset(slot, _WORKER)
        self._write(offset, _WORKER[1], record.pid, int(record.phase), reason, record.write_errors)

    def reaped(self, slot: int) -> ReapedRecord:
        return ReapedRecord(*self._read(self._slot_offset(slot, _REAPED), _REAPED[1]))

    def write_reaped(self, slot: int, record: ReapedRecord) -> None:
        offset = self._slot_offset(slot, _REAPED)
        self._write(offset, _REAPED[1], record.last_pid, record.cpu_seconds, record.reaps)

    def ledger(self, slot: int) -> LedgerRecord:
        return LedgerRecord(*self._read(self._slot_offset(slot, _LEDGER), _LEDGER[1]))

    def write_ledger(self, slot: int, record: LedgerRecord) -> None:
        offset = self._slot_offset(slot, _LEDGER)
        self._write(offset, _LEDGER[1], record.served_cpu)

    def loop_due(self, slot: int) -> float:
        """When the slot's worker's event-loop timer is due (``time.monotonic()``); 0.0: none armed."""
        return float(self._read(self._slot_offset(slot, _LOOP), _LOOP[1])[0])

    def write_loop_due(self, slot: int, due: float) -> None:
        self._write(self._slot_offset(slot, _LOOP), _LOOP[1], due)

    def held_cells(self, slot: int) -> HeldCellsRecord:
        fd, inode = self._read(self._slot_offset(slot, _CELLS), _CELLS[1])
        return HeldCellsRecord(fd - 1, inode)  # stored plus one, so that a zeroed slot holds none

    def write_held_cells(self, slot: int, record: HeldCellsRecord) -> None:
        self._write(self._slot_offset(slot, _CELLS), _CELLS[1], record.fd + 1, record.inode & 0xFFFFFFFF)

    def all_held_cells(self) -> dict[int, HeldCellsRecord]:
        """Slot -> its held cells file, for the slots whose file the master holds (one pass over the
        table: a scrape reads this)."""
        words = memoryview(self._m[_HEADER_SIZE:TABLE_SIZE]).cast("Q")
        stride, first = _SLOT_SIZE // 8, (_CELLS[0] + 8) // 8
        found = {}
        for slot, word in enumerate(words[first::stride].tolist()):
            if word:
                record = self.held_cells(slot)
                if record.fd >= 0:
                    found[slot] = record
        return found

    @contextlib.contextmanager
    def metrics_side_lock(self) -> Iterator[None]:
        """Exclusive between the metrics-side processes (two peers serve at once), for read-modify-write
        of their records; POSIX record locks are per process, so threads need their own lock too."""
        if self._lock_fd is None:
            with contextlib.suppress(OSError):
                self._lock_fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        if self._lock_fd is None:
            yield
            return
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX, 1, _METRICS[0])
        try:
            yield
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, _METRICS[0])

    def metrics_side(self) -> MetricsSideRecord:
        workers, metrics, ended, *procs = self._read(*_METRICS)
        pairs = tuple((procs[i], procs[i + 1]) for i in range(0, len(procs), 2) if procs[i])
        return MetricsSideRecord(workers, metrics, ended, pairs)

    def write_metrics_side(self, record: MetricsSideRecord) -> None:
        procs = list(record.processes)[:METRICS_SIDE_PROCESSES]
        procs += [(0, 0.0)] * (METRICS_SIDE_PROCESSES - len(procs))
        flat = [x for pair in procs for x in pair]
        self._write(*_METRICS, record.workers_served, record.metrics_served, record.ended_cpu, *flat)

    def used_slots(self) -> Iterator[int]:
        """Slots that ever had a holder (their records are not all zero)."""
        for slot in range(MAX_SLOTS):
            start = _HEADER_SIZE + slot * _SLOT_SIZE
            if any(self._m[start : start + _SLOT_SIZE]):
                yield slot


# --- opening --------------------------------------------------------------------------------------------

# One mapping per table path and process. Workers inherit the master's entry across fork, so they share
# its mapping instead of opening the file.
_open: dict[str, Table] = {}


def table_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / STATE_DIR / TABLE_FILE


def create(directory: str | os.PathLike[str]) -> Table:
    """Create and fully allocate the table of a freshly emptied directory (in the master, at start).

    Raises OSError (ENOSPC when the filesystem cannot hold it): the caller refuses to start.
    """
    path = table_path(directory)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, TABLE_SIZE)  # every page backed now: no SIGBUS later on a full disk
        memory = mmap.mmap(fd, TABLE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
    memory[0 : len(MAGIC)] = MAGIC
    table = _open[str(path)] = Table(path, memory)
    return table


def open_table(directory: str | os.PathLike[str]) -> Table | None:
    """This process's mapping of the directory's table (opened once), or None if there is none (yet)."""
    path = table_path(directory)
    table = _open.get(str(path))
    if table is not None:
        return table
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _map(path, fd)
    finally:
        os.close(fd)


def adopt_table(directory: str | os.PathLike[str], fd: int) -> Table | None:
    """Map the directory's table from ``fd``, an open descriptor of its file handed down by the master
    (the metrics peers'), so that later ``open_table`` calls find it whatever happens to the path: a peer
    that starts, or first looks, after an ``rm -rf`` of the directory still has the lifecycle counts. The
    descriptor stays open, for the peers this one may start."""
    path = table_path(directory)
    table = _open.get(str(path))
    return table if table is not None else _map(path, fd)


def _map(path: Path, fd: int) -> Table | None:
    """The table in file ``fd``, registered as this process's mapping of ``path``; None if it is not one."""
    try:
        if os.fstat(fd).st_size < TABLE_SIZE:
            return None
        memory = mmap.mmap(fd, TABLE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        return None
    if memory[0 : len(MAGIC)] != MAGIC:
        memory.close()
        return None
    table = _open[str(path)] = Table(path, memory)
    return table


def forget(directory: str | os.PathLike[str]) -> None:
    """Drop this process's mapping (the master, when it removes the directory on a clean stop)."""
    table = _open.pop(str(table_path(directory)), None)
    if table is not None:
        with contextlib.suppress(BufferError, ValueError):
            table._m.close()


# --- write errors: counted where a full disk cannot stop the count --------------------------------------

#: Where this process counts its failed metric writes: ("master", None) or ("worker", slot), with the
#: table; bound to the pid that set it, so a forked child does not count into its parent's record.
_counter_home: tuple[int, Table, int | None] | None = None
_reported: set[str] = set()
_error_lock = threading.Lock()


def count_write_errors_as(table: Table | None, slot: int | None) -> None:
    """Make this process's failed writes count in its slot's record (a worker) or the master's (None)."""
    global _counter_home
    _counter_home = (os.getpid(), table, slot) if table is not None else None


def record_write_error(path: str | os.PathLike[str], err: BaseException, what: str = "metrics") -> None:
    """Count a failed metric write of this process and log it once per process and path, with a remedy.

    Never raises: it is called from the request path and from hooks that must not fail a worker.
    """
    key = os.fspath(path)
    if key not in _reported and len(_reported) < 100:
        _reported.add(key)
        reason = getattr(err, "strerror", None) or repr(err)
        if isinstance(err, FileNotFoundError):  # the directory was removed under the server
            remedy = (
                "PROMETHEUS_MULTIPROC_DIR was removed: the master creates it again before the next worker "
                "starts (HTTP metrics are kept through the removal)"
            )
        else:
            remedy = (
                "Give PROMETHEUS_MULTIPROC_DIR more space (e.g. a larger /dev/shm: docker run --shm-size, "
                "or an emptyDir with medium Memory and a sizeLimit) and make it writable"
            )
        print(
            f"[gunicorn-prometheus] pid {os.getpid()}: cannot write {what} to {key}: {reason}; requests are "
            f"served as usual but some metrics are not counted. {remedy}; this is logged once per process "
            "and counted in gunicorn_metrics_write_errors_total.",
            file=sys.stderr,
            flush=True,
        )
    home = _counter_home
    if home is None or home[0] != os.getpid():
        return
    _, table, slot = home
    with _error_lock, contextlib.suppress(Exception):
        if slot is None:
            record = table.server()
            table.write_server(replace(record, write_errors=record.write_errors + 1))
        else:
            worker = table.worker(slot)
            table.write_worker(slot, replace(worker, write_errors=worker.write_errors + 1))


def write_errors(table: Table) -> dict[str, int]:
    """Failed metric writes so far, by process label (``master``, ``w0``…), for the metrics server."""
    found = {MASTER_LABEL: table.server().write_errors}
    for slot in table.used_slots():
        found[slot_name(slot)] = table.worker(slot).write_errors
    return found
