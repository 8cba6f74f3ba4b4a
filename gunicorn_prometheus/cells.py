"""The HTTP metrics' shared-memory cells: one memory-mapped file per worker slot, written through.

Why not prometheus_client's files for these
-------------------------------------------
The HTTP metrics are the one family this package writes *and* reads, on every request. Through
prometheus_client's value objects each request would cost a lock, a pid check, a key lookup and a packed
mmap write per value (~10 µs in multiprocess mode, see :mod:`gunicorn_prometheus.instrumentation`), which
is why the middleware used to batch in memory and lose up to 0.1 s of requests on SIGKILL. Here a label set
is resolved *once* to fixed positions in a ``MAP_SHARED`` mapping, and each request adds to two float64
cells in place: a store into a shared page is visible to the metrics server at once and outlives a SIGKILL
of the writer. prometheus_client has no public API for this (its files are keyed entries it owns).

Files
-----
``http_<identity>.cells`` in the multiprocess directory, where identity is the worker's slot identity
(``w0``, ``w1``...; :mod:`gunicorn_prometheus.slots`), so a replacement worker reopens its predecessor's
file and continues its counters, and the directory holds at most as many files as workers were ever alive
at once. Without slots (the middleware used on its own) the identity is the pid. Only one live process
ever writes a given file (the slot table's invariant); any number of processes may read it.

Under Gunicorn the master opens a slot's file before it forks the slot's first worker
(:meth:`CellsWriter.hold`) and keeps it open for its whole life; each worker of the slot writes through
the inherited descriptor (:func:`give`), not the path, and the metrics server reads it through the
master's descriptor (see :mod:`gunicorn_prometheus.collector`). So removing the directory, or the file,
loses nothing: the slot's counts live on in the open file, and its next worker continues them.

Layout, version 1 (native byte order, i.e. little-endian on every platform the image ships; all offsets
and sizes are multiples of 8 so every cell is an aligned 8-byte word)::

    header (chunk 0, offset 0)
      0   8 bytes  magic  b"GPCELLS\\n"
      8   u32      version (1)                 12  u32  header size in bytes (H)
      16  u64      used: bytes of the file holding complete records (the publish pointer)
      24  u64      pid of the latest writer (informational)
      32  u32      number of finite bucket bounds (n)   36  u32  chunk size in bytes (C)
      40  24 bytes reserved (zero)
      64  n x f64  the finite upper bounds, increasing (+Inf is implied)
      ..  (n+2) x f64  overflow histogram row: sum, n+1 buckets (the requests of label sets that
                       could not be stored: gunicorn_metrics_write_errors_total)
      ..  1 x f64  overflow in-progress cell (not served)
    records, from offset H up to ``used``, each 8-aligned and never crossing a chunk boundary
      0   u32 record size in bytes   4  u16 kind   6  u16 key size in bytes (K)
      8   K bytes: the label values as a UTF-8 JSON array, zero-padded to a multiple of 8
      ..  cells
            kind 1, histogram row (method, path, status_code, app_name):
                (n+2) x f64: sum, then n+1 non-cumulative bucket counts (the last is +Inf);
                then n+1 exemplar slots of 6 words each: u64 sequence, f64 value, f64 unix time,
                u64 trace id high, u64 trace id low, u64 span id
            kind 2, in-progress gauge (method, app_name): 1 x f64
            kind 0, padding to the end of a chunk: no key, no cells

Writers and readers
-------------------
The writer reserves the file in chunks of C bytes with ``posix_fallocate`` (at open, then whenever a new
label set does not fit), so a full filesystem is an ``OSError`` at that moment, never a SIGBUS on a later
store into an unbacked page; each chunk is its own mapping, so growing never moves cells already handed
out. A new record is written completely (its cells are the zeros fallocate left) *before* ``used`` is
advanced to cover it, so a reader never sees a half-written key. A new file is built under
``http_<identity>.cells.tmp`` (header written, first chunk allocated) and renamed into place, so no
reader ever finds an empty or headerless file under the real name. If the filesystem is full the label
set is given the header's overflow row instead: its requests are still counted, as write errors, and
nothing fails. If the file itself cannot be created, the cells live in anonymous memory that no reader
sees, and each request given the overflow row is counted as a write error of the process in the shared
table (:mod:`gunicorn_prometheus.shared_state`). A failed allocation is tried again at most every
``RETRY_SECONDS``, so counting by label resumes once there is room.

Torn reads: each cell is one aligned 8-byte store by the writer and one aligned 8-byte load by the reader
(both sides go through mappings, never ``read()``, whose kernel copy could split a word), so a cell is read
either before or after an update, never half of each. A row *may* be read mid-update (the sum already
increased, the bucket not yet): this needs no row lock because every histogram cell only ever grows, so
each scrape sees every cell at a value >= the previous scrape's, ``_count`` (the sum of the buckets) never
goes down, and cumulative buckets stay ordered; ``_sum`` and ``_count`` may disagree by the one request in
flight until the next scrape. Exemplar slots are several words, so they carry a sequence word (odd while
being written, seqlock style): a reader keeps a slot only if it read the same even sequence before and
after it. A file that fails any check (magic, version, sizes, a key that is not a JSON array of strings of
the right length, a negative or non-finite counter) is skipped as a whole: torn, foreign or short.

Cells are updated from one thread per process (the event loop's); the in-progress cells of a slot are
reset by its next holder and by the master when it reaps the holder (:func:`reset_in_progress`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import re
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from . import shared_state

log = logging.getLogger(__name__)

MAGIC = b"GPCELLS\n"
VERSION = 1
FILE_SUFFIX = ".cells"
FILE_PREFIX = "http_"
FILE_RE = re.compile(r"http_(?P<identity>[A-Za-z0-9.-]+)\.cells")
#: A file being created is built under its name plus this (no reader lists it), then renamed into place.
TMP_SUFFIX = ".tmp"
#: After a storage failure (full disk, removed directory), the next allocation is tried this much later,
#: not on every request: a full disk must not cost a system call per request.
RETRY_SECONDS = 2.0

KIND_PAD = 0
KIND_HISTOGRAM = 1
KIND_IN_PROGRESS = 2

#: Words per exemplar slot: sequence, value, timestamp, trace id high, trace id low, span id.
EXEMPLAR_WORDS = 6
#: Label values longer than this (as JSON) are not stored: a record must fit in a chunk.
MAX_KEY_BYTES = 2048
#: More bucket bounds than any real histogram has (a header field beyond this means a foreign file).
MAX_BOUNDS = 1024
#: A file grows by this much at a time (more when the bucket count needs it).
DEFAULT_CHUNK_BYTES = 64 * 1024
#: Upper bound of one file: far above what bounded label values produce (routes x methods x statuses).
MAX_FILE_BYTES = 64 * 1024 * 1024

_HEADER_FIXED = struct.Struct("=8sIIQQII24x")  # magic, version, header size, used, pid, n, chunk
_RECORD_HEAD = struct.Struct("=IHH")


#: The retry clock; a module global so tests can substitute a fake one.
_monotonic = time.monotonic


def _align8(n: int) -> int:
    return (n + 7) & ~7


def header_bytes(n_bounds: int) -> int:
    return _HEADER_FIXED.size + 8 * n_bounds + 8 * (n_bounds + 2) + 8


def histogram_cells(n_bounds: int) -> int:
    """Words of a histogram row after its key: sum, buckets, exemplar slots."""
    return (n_bounds + 2) + EXEMPLAR_WORDS * (n_bounds + 1)


def chunk_bytes_for(n_bounds: int) -> int:
    largest = header_bytes(n_bounds) + _RECORD_HEAD.size + MAX_KEY_BYTES + 8 * histogram_cells(n_bounds)
    page = mmap.ALLOCATIONGRANULARITY
    return max(DEFAULT_CHUNK_BYTES, (largest + page - 1) // page * page)


def finite_bounds(buckets: Iterable[float]) -> tuple[float, ...]:
    """Bucket upper bounds without the implied +Inf; ValueError unless finite and strictly increasing."""
    bounds = [float(b) for b in buckets]
    if bounds and bounds[-1] == math.inf:
        bounds.pop()
    if not all(math.isfinite(b) for b in bounds) or bounds != sorted(set(bounds)) or len(bounds) > MAX_BOUNDS:
        raise ValueError(f"buckets must be finite, increasing and at most {MAX_BOUNDS}: {buckets!r}")
    return tuple(bounds)


def file_name(identity: str) -> str:
    return f"{FILE_PREFIX}{identity}{FILE_SUFFIX}"


class StorageError(OSError):
    """The cells file could not be created, validated or grown."""


#: Files the master opened for this process before forking it (:meth:`CellsWriter.hold`): absolute path
#: -> (pid they were given to, descriptor). Bound to the pid: a process forked from the worker opens its
#: own by path, as before (one writer per file).
_given: dict[str, tuple[int, int]] = {}


def give(directory: str, identity: str, fd: int) -> None:
    """Have this process's writer of ``identity`` in ``directory`` use ``fd`` (inherited from the master,
    which holds the file open) instead of opening the path: if the directory was removed, the file still
    is the slot's, with everything counted in it so far."""
    _given[os.path.abspath(os.path.join(directory, file_name(identity)))] = (os.getpid(), fd)


def _take_given(path: str) -> int | None:
    entry = _given.pop(os.path.abspath(path), None)
    return entry[1] if entry is not None and entry[0] == os.getpid() else None


def _reserve(fd: int, offset: int, length: int) -> None:
    """Back [offset, offset+length) with real blocks now, so later stores cannot SIGBUS."""
    try:
        os.posix_fallocate(fd, offset, length)
    except AttributeError:  # no posix_fallocate (macOS): writing zeros allocates as well
        os.pwrite(fd, bytes(length), offset)


@dataclass(slots=True)
class HistogramRow:
    """Where one label set's histogram lives: ``cells[base]`` is the sum, ``cells[base+1+i]`` bucket i."""

    cells: memoryview[float]  # float64 view of the row's chunk
    words: memoryview[int]  # uint64 view of the same chunk (exemplar sequence and ids)
    base: int
    exemplars: int  # index of the first exemplar slot, or -1 (the overflow row keeps none)


@dataclass(slots=True)
class GaugeCell:
    cells: memoryview[float]
    index: int


@dataclass
class _Chunk:
    mapping: mmap.mmap
    cells: memoryview[float]
    words: memoryview[int]


class CellsWriter:
    """This process's cells: one file (or anonymous memory when there is no directory or it fails).

    ``histogram(labels)`` and ``in_progress(labels)`` return where a label set's cells are, allocating a
    record the first time; callers cache the result and update the cells directly.
    """

    def __init__(self, bounds: Sequence[float], directory: str | None = None, identity: str | None = None):
        self._prepare(bounds, directory, identity)
        if self.path is not None:
            try:
                self._open_file()
            except OSError as err:
                self._degrade(err, "cannot create or open")
        if not self.chunks:  # no directory, or it failed: same code path over anonymous memory
            self._new_anonymous()
        self._point_overflow()

    def _prepare(self, bounds: Sequence[float], directory: str | None, identity: str | None) -> None:
        self.bounds = finite_bounds(bounds)
        self.n = len(self.bounds)
        self.header_size = header_bytes(self.n)
        self.chunk_size = chunk_bytes_for(self.n)
        self.path: str | None = None
        if directory is not None:
            self.path = os.path.join(directory, file_name(identity or str(os.getpid())))
        self.fd = -1
        self.chunks: list[_Chunk] = []
        self.used = self.header_size
        #: while set, new label sets go to the overflow row; allocation is tried again once RETRY_SECONDS
        #: have passed since ``failed_at`` (a full disk may get room again)
        self.failed = False
        self.failed_at = 0.0
        self._error: OSError = StorageError("no storage")
        #: bumped whenever storage comes back after a failure: callers' cached overflow rows are stale
        self.generation = 0
        # Mappings replaced by a file that could be created later: callers may still hold views of them
        # (the overflow row, an in-flight request's gauge cell), so they are never unmapped.
        self._retired: list[_Chunk] = []
        self._histograms: dict[tuple[str, ...], HistogramRow] = {}
        self._gauges: dict[tuple[str, ...], GaugeCell] = {}

    @classmethod
    def hold(cls, bounds: Sequence[float], directory: str, identity: str) -> int:
        """Open the file of ``identity`` exactly as its writer would (continued if it is valid, else
        created complete under the temporary name and renamed into place) and return its descriptor,
        read-write, without keeping any mapping: the master's, for the slot it is about to fork a worker
        into (see :func:`give`). Raises OSError when the file can be neither opened nor created."""
        writer = cls.__new__(cls)
        writer._prepare(bounds, directory, identity)
        writer._open_file()
        writer._unmap()
        fd, writer.fd = writer.fd, -1
        return fd

    @property
    def overflow_visible(self) -> bool:
        """Whether the overflow row is in the file, where readers count it as write errors; if not (the
        file could not be created: anonymous memory), its requests must be counted elsewhere."""
        return self.fd >= 0 or self.path is None

    def _point_overflow(self) -> None:
        self.overflow = HistogramRow(self.chunks[0].cells, self.chunks[0].words, self._overflow_base(), -1)
        self.overflow_gauge = GaugeCell(self.chunks[0].cells, self._overflow_base() + self.n + 2)

    # --- opening -------------------------------------------------------------------------------------
    def _overflow_base(self) -> int:
        return (_HEADER_FIXED.size + 8 * self.n) // 8

    def _new_anonymous(self) -> None:
        self.fd = -1
        self.chunks = [self._map(-1, 0)]
        self._write_header(self.chunks[0])
        self.used = self.header_size

    def _map(self, fd: int, offset: int) -> _Chunk:
        if fd < 0:
            mapping = mmap.mmap(-1, self.chunk_size)
        else:
            mapping = mmap.mmap(fd, self.chunk_size, mmap.MAP_SHARED, offset=offset)
        view = memoryview(mapping)
        return _Chunk(mapping, view.cast("d"), view.cast("Q"))

    def _write_header(self, chunk: _Chunk) -> None:
        mapping = chunk.mapping
        struct.pack_into(f"={self.n}d", mapping, _HEADER_FIXED.size, *self.bounds)
        head = _HEADER_FIXED.pack(b"\0" * 8, VERSION, self.header_size, self.header_size, os.getpid(),
                                  self.n, self.chunk_size)  # fmt: skip
        mapping[8 : _HEADER_FIXED.size] = head[8:]
        mapping[0:8] = MAGIC  # last: a file without it is skipped by readers

    def _open_file(self) -> None:
        assert self.path is not None
        fd = _take_given(self.path)
        given = fd is not None
        if fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                self._create_file()
                return
        try:
            continued = self._continue(fd, os.fstat(fd).st_size)
        except BaseException:
            self._unmap()
            os.close(fd)
            raise
        if continued:
            self.fd = fd
            return
        os.close(fd)
        if given:
            # Not this writer's layout (a middleware of its own with other buckets): what it had is left
            # to its readers, and this writer goes by the path, as without a master.
            log.warning("HTTP metrics: the file the master opened for %s has another layout; opening it "
                        "by its path", self.path)  # fmt: skip
            self._open_file()
        else:
            # Another layout (version, buckets) or damaged: start a new file under the same name. Its old
            # counts are lost to this slot; only a bucket change without a restart leads here.
            log.warning("HTTP metrics: %s has another layout or is damaged; starting it afresh",
                        self.path)  # fmt: skip
            self._create_file()

    def _create_file(self) -> None:
        """Build a complete first chunk (allocated, header written) under a temporary name, then rename
        it into place: readers never see a file under the real name that is empty or has no header yet,
        and a creation that fails (a full disk) leaves nothing behind. One writer per identity, so the
        temporary name is fixed (a leftover of a writer killed mid-creation is simply reused)."""
        assert self.path is not None
        tmp = self.path + TMP_SUFFIX
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _reserve(fd, 0, self.chunk_size)
            self.chunks = [self._map(fd, 0)]
            self._write_header(self.chunks[0])
            self.used = self.header_size
            os.replace(tmp, self.path)  # readers holding an old file keep reading the old inode
        except BaseException:
            self._unmap()
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.fd = fd

    def _continue(self, fd: int, size: int) -> bool:
        """Take over an existing file (a predecessor's in this slot): index its records, reset gauges."""
        if not size or size % self.chunk_size or size > MAX_FILE_BYTES:
            return False
        head = os.pread(fd, self.header_size, 0)
        parsed = _parse_header(head, size)
        if parsed is None or parsed.bounds != self.bounds or parsed.chunk_size != self.chunk_size:
            return False
        self.chunks = [self._map(fd, offset) for offset in range(0, size, self.chunk_size)]
        whole = b"".join(chunk.mapping[:] for chunk in self.chunks)  # private copy, for parsing only
        records = _parse_records(whole, parsed)
        if records is None:
            self._unmap()
            return False
        for kind, labels, offset in records:
            chunk = self.chunks[offset // self.chunk_size]
            index = (offset % self.chunk_size) // 8
            if kind == KIND_HISTOGRAM:
                self._histograms[labels] = HistogramRow(chunk.cells, chunk.words, index, index + self.n + 2)
            else:
                chunk.cells[index] = 0.0  # the previous holder is gone: nothing of it is in progress
                self._gauges[labels] = GaugeCell(chunk.cells, index)
        self.used = parsed.used
        self.chunks[0].words[3] = os.getpid()
        return True

    def close(self) -> None:
        """Unmap and close the file (benchmarks and tests; a worker keeps its cells for its whole life).

        Rows handed out before must not be used afterwards.
        """
        self._unmap()
        self.chunks, self._retired = self._retired, []
        self._unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _unmap(self) -> None:
        for chunk in self.chunks:
            chunk.cells.release()
            chunk.words.release()
            chunk.mapping.close()
        self.chunks = []

    # --- allocation ----------------------------------------------------------------------------------
    def histogram(self, labels: tuple[str, ...]) -> HistogramRow:
        """The label set's row, or the overflow row when it cannot be stored (not remembered here: asked
        again, after RETRY_SECONDS, a label set gets a row of its own once there is room)."""
        row = self._histograms.get(labels)
        if row is None:
            found = self._allocate(KIND_HISTOGRAM, labels, histogram_cells(self.n))
            if found is None:
                return self.overflow
            chunk, index = found
            row = self._histograms[labels] = HistogramRow(chunk.cells, chunk.words, index, index + self.n + 2)
        return row

    def in_progress(self, labels: tuple[str, ...]) -> GaugeCell:
        cell = self._gauges.get(labels)
        if cell is None:
            found = self._allocate(KIND_IN_PROGRESS, labels, 1)
            if found is None:
                return self.overflow_gauge
            cell = self._gauges[labels] = GaugeCell(found[0].cells, found[1])
        return cell

    def count_unstored(self) -> None:
        """Count one request recorded in the overflow row when no reader can see that row (the file
        could not be created): as a write error of this process in the shared table, which is shared
        memory allocated at start, so counting there needs no room on the disk."""
        if not self.overflow_visible:
            shared_state.record_write_error(self.path or "", self._error, "HTTP metrics")

    def retry_due(self) -> bool:
        """Whether storage failed and may be tried again now (at most once every RETRY_SECONDS)."""
        return self.failed and _monotonic() - self.failed_at >= RETRY_SECONDS

    def _recover(self) -> bool:
        """Try the failed storage again: create the file if there is none (with a file, the allocation
        that follows grows it if it needs room)."""
        if self.fd >= 0:
            return True
        anonymous = self.chunks
        self.chunks = []
        try:
            self._open_file()
        except OSError as err:
            self.chunks = anonymous
            self._degrade(err, "cannot create or open")
            return False
        self._retired.extend(anonymous)
        self._point_overflow()
        self._recovered()
        return True

    def _recovered(self) -> None:
        self.failed = False
        self.generation += 1
        log.warning("HTTP metrics: %s is writable again; new label sets are counted by label", self.path)

    def _allocate(self, kind: int, labels: tuple[str, ...], n_cells: int) -> tuple[_Chunk, int] | None:
        """Append a record; return its chunk and the index of its first cell, or None (overflow)."""
        if self.failed and not (self.retry_due() and self._recover()):
            return None
        key = json.dumps(list(labels), ensure_ascii=False, separators=(",", ":")).encode()
        if len(key) > MAX_KEY_BYTES:
            log.warning("HTTP metrics: label values too long to store (%d bytes), not counted: %.200r",
                        len(key), labels)  # fmt: skip
            return None
        size = _RECORD_HEAD.size + _align8(len(key)) + 8 * n_cells
        used = self.used
        offset_in_chunk = used - (len(self.chunks) - 1) * self.chunk_size
        if offset_in_chunk + size > self.chunk_size:  # a record never crosses a chunk boundary
            if not self._grow():
                return None
            if offset_in_chunk < self.chunk_size:  # pad the rest of the old chunk
                pad = self.chunk_size - offset_in_chunk
                _RECORD_HEAD.pack_into(self.chunks[-2].mapping, offset_in_chunk, pad, KIND_PAD, 0)
            used = (len(self.chunks) - 1) * self.chunk_size
            offset_in_chunk = 0
        chunk = self.chunks[-1]
        _RECORD_HEAD.pack_into(chunk.mapping, offset_in_chunk, size, kind, len(key))
        start = offset_in_chunk + _RECORD_HEAD.size
        chunk.mapping[start : start + len(key)] = key
        self.used = used + size
        self.chunks[0].words[2] = self.used  # publish: the record is complete
        if self.failed:
            self._recovered()
        return chunk, (start + _align8(len(key))) // 8

    def _grow(self) -> bool:
        """One more chunk, really allocated; False (logged once, then overflow) when that fails."""
        offset = len(self.chunks) * self.chunk_size
        if self.fd < 0:  # anonymous memory (no directory): nothing to reserve
            self.chunks.append(self._map(-1, 0))
            return True
        try:
            if offset + self.chunk_size > MAX_FILE_BYTES:
                raise StorageError(f"the file reached its bound of {MAX_FILE_BYTES} bytes")
            _reserve(self.fd, offset, self.chunk_size)
            self.chunks.append(self._map(self.fd, offset))
        except OSError as err:
            self._degrade(err, "cannot grow")
            return False
        return True

    def _degrade(self, err: OSError, what: str) -> None:
        """New label sets go to the overflow row until a retry succeeds; logged once per failure spell."""
        self.failed_at = _monotonic()
        self._error = err
        if self.failed:
            return
        self.failed = True
        log.warning(
            "HTTP metrics: %s %s: %s. Requests of new label sets are not counted by label but in "
            "gunicorn_metrics_write_errors_total; the app keeps serving. Give PROMETHEUS_MULTIPROC_DIR "
            "more room (e.g. a larger /dev/shm: docker run --shm-size) or a writable place: storage is "
            "tried again every %g s and counting by label resumes by itself.",
            what,
            self.path,
            err.strerror or err,
            RETRY_SECONDS,
        )

    # --- in-process reading (no directory: the middleware's own registry) ----------------------------
    def snapshot(self, identity: str = "self") -> CellsSnapshot:
        """This process's cells as a reader would see them (a copy: the chunks are separate mappings)."""
        whole = b"".join(chunk.mapping[:] for chunk in self.chunks)
        snapshot = parse_cells(whole, len(whole), identity)
        assert snapshot is not None, "own cells failed validation"
        return snapshot


# --- reading -------------------------------------------------------------------------------------------
@dataclass
class _Header:
    used: int
    pid: int
    bounds: tuple[float, ...]
    chunk_size: int
    header_size: int


def _parse_header(data: bytes | memoryview | mmap.mmap, size: int) -> _Header | None:
    """The header of a file of ``size`` bytes whose start is ``data``; None unless fully consistent."""
    if size < _HEADER_FIXED.size or len(data) < _HEADER_FIXED.size:
        return None
    magic, version, header_size, used, pid, n, chunk_size = _HEADER_FIXED.unpack_from(data)
    if magic != MAGIC or version != VERSION or n > MAX_BOUNDS or header_size != header_bytes(n):
        return None
    if chunk_size != chunk_bytes_for(n) or size % chunk_size or not header_size <= used <= size:
        return None
    if len(data) < header_size:
        return None
    bounds = struct.unpack_from(f"={n}d", data, _HEADER_FIXED.size)
    if not all(math.isfinite(b) for b in bounds) or list(bounds) != sorted(set(bounds)):
        return None  # bounds must be finite and strictly increasing
    return _Header(used, pid, bounds, chunk_size, header_size)


_ARITY = {KIND_HISTOGRAM: 4, KIND_IN_PROGRESS: 2}


_Record = tuple[int, tuple[str, ...], int]


def _parse_records(data: bytes | memoryview, header: _Header) -> list[_Record] | None:
    """(kind, labels, offset of the first cell) of every record up to ``used``; None if any is bad."""
    records = []
    offset = header.header_size
    n = len(header.bounds)
    sizes = {KIND_HISTOGRAM: histogram_cells(n), KIND_IN_PROGRESS: 1}
    while offset < header.used:
        if offset + _RECORD_HEAD.size > header.used:
            return None
        size, kind, key_size = _RECORD_HEAD.unpack_from(data, offset)
        chunk_end = (offset // header.chunk_size + 1) * header.chunk_size
        if size < 8 or size % 8 or offset + size > min(chunk_end, header.used):
            return None
        if kind == KIND_PAD:
            if offset + size != chunk_end:
                return None
            offset += size
            continue
        cells = sizes.get(kind)
        start = offset + _RECORD_HEAD.size
        if cells is None or size != _RECORD_HEAD.size + _align8(key_size) + 8 * cells:
            return None
        labels = _decode_key(bytes(data[start : start + key_size]), _ARITY[kind])
        if labels is None:
            return None
        records.append((kind, labels, start + _align8(key_size)))
        offset += size
    return records


_key_cache: dict[bytes, tuple[str, ...]] = {}


def _decode_key(key: bytes, arity: int) -> tuple[str, ...] | None:
    labels = _key_cache.get(key)
    if labels is None:
        try:
            values = json.loads(key)
        except ValueError:
            return None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return None
        if len(_key_cache) > 100_000:
            _key_cache.clear()
        labels = _key_cache[key] = tuple(values)
    return labels if len(labels) == arity else None


@dataclass
class Exemplar:
    trace_id: str
    span_id: str
    value: float
    timestamp: float


@dataclass
class CellsSnapshot:
    """What one file held at the moment it was read."""

    identity: str
    bounds: tuple[float, ...]
    #: labels -> [sum, bucket 0..n] (non-cumulative)
    histograms: dict[tuple[str, ...], list[float]] = field(default_factory=dict)
    #: labels -> per bucket, the exemplar or None
    exemplars: dict[tuple[str, ...], list[Exemplar | None]] = field(default_factory=dict)
    in_progress: dict[tuple[str, ...], float] = field(default_factory=dict)
    write_errors: float = 0.0


def read_file(path: str, identity: str) -> CellsSnapshot | None:
    """Read one cells file through a read-only mapping; None if it vanished, is short, torn or foreign."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return read_fd(fd, identity)
    finally:
        os.close(fd)


def read_fd(fd: int, identity: str, size: int | None = None) -> CellsSnapshot | None:
    """Read the open cells file ``fd`` (of ``size`` bytes, if its caller already knows) like read_file."""
    if size is None:
        size = os.fstat(fd).st_size
    if size < _HEADER_FIXED.size:
        raise StorageError(f"{size} bytes is shorter than a header")
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapping:
        view = memoryview(mapping)
        try:
            return parse_cells(view, size, identity)
        finally:
            view.release()


def parse_cells(data: bytes | memoryview, size: int, identity: str) -> CellsSnapshot | None:
    """Decode a cells file's bytes (a mapping: cells are then read as whole words); None if invalid."""
    header = _parse_header(data, size)
    if header is None:
        return None
    records = _parse_records(data, header)
    if records is None:
        return None
    n = len(header.bounds)
    raw = memoryview(data).cast("B")[: header.used]
    words, ids = raw.cast("d"), raw.cast("Q")
    try:
        snapshot = CellsSnapshot(identity, header.bounds)
        base = (_HEADER_FIXED.size + 8 * n) // 8
        overflow = words[base : base + n + 2].tolist()
        if not _counters_valid(overflow):
            return None
        snapshot.write_errors = sum(overflow[1:])
        for kind, labels, offset in records:
            index = offset // 8
            if kind == KIND_HISTOGRAM:
                if labels in snapshot.histograms:  # a duplicate key: only a foreign writer makes these
                    return None
                row = cast(list[float], words[index : index + n + 2].tolist())  # typeshed says list[int]
                if not _counters_valid(row):
                    return None
                snapshot.histograms[labels] = row
                snapshot.exemplars[labels] = _read_exemplars(words, ids, index + n + 2, n + 1)
            else:
                value = words[index]
                if not math.isfinite(value):
                    return None
                snapshot.in_progress[labels] = snapshot.in_progress.get(labels, 0.0) + value
        return snapshot
    finally:
        words.release()
        ids.release()
        raw.release()


def _counters_valid(row: Sequence[float]) -> bool:
    return all(v >= 0.0 and math.isfinite(v) for v in row)


def _read_exemplars(
    words: memoryview[float], ids: memoryview[int], start: int, buckets: int
) -> list[Exemplar | None]:
    found: list[Exemplar | None] = []
    for bucket in range(buckets):
        slot = start + bucket * EXEMPLAR_WORDS
        sequence = ids[slot]
        if sequence == 0 or sequence % 2:
            found.append(None)  # never written, or being written right now
            continue
        value, timestamp = words[slot + 1], words[slot + 2]
        high, low, span = ids[slot + 3], ids[slot + 4], ids[slot + 5]
        if ids[slot] != sequence or not (math.isfinite(value) and math.isfinite(timestamp)):
            found.append(None)
            continue
        found.append(Exemplar(f"{high:016x}{low:016x}", f"{span:016x}" if span else "", value, timestamp))
    return found


def write_exemplar(row: HistogramRow, bucket: int, value: float, timestamp: float, trace_high: int,
                   trace_low: int, span: int) -> None:  # fmt: skip
    """Keep this request as the bucket's exemplar (seqlock: odd sequence while the slot is written)."""
    if row.exemplars < 0:
        return
    slot = row.exemplars + bucket * EXEMPLAR_WORDS
    words, cells = row.words, row.cells
    sequence = words[slot]
    words[slot] = sequence | 1
    cells[slot + 1] = value
    cells[slot + 2] = timestamp
    words[slot + 3] = trace_high
    words[slot + 4] = trace_low
    words[slot + 5] = span
    words[slot] = (sequence | 1) + 1


def cell_files(directory: str) -> list[tuple[str, str]]:
    """(path, identity) of every cells file in ``directory``, sorted by name."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = FILE_RE.fullmatch(name)
        if match:
            found.append((os.path.join(directory, name), match["identity"]))
    return found


def reset_in_progress(directory: str, identity: str) -> None:
    """Zero the in-progress cells of a reaped process's file (master side; the file is not written now).

    Written with ``pwrite`` over blocks the file already has, so this needs no free space.
    """
    path = os.path.join(directory, file_name(identity))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        reset_in_progress_fd(fd)
    finally:
        os.close(fd)


def reset_in_progress_fd(fd: int) -> None:
    """:func:`reset_in_progress` of a file the master holds open (``fd``, read-write), whatever its path."""
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapping:
            view = memoryview(mapping)
            try:
                header = _parse_header(view, size)
                records = _parse_records(view, header) if header else None
            finally:
                view.release()
        for kind, _labels, offset in records or ():
            if kind == KIND_IN_PROGRESS:
                os.pwrite(fd, bytes(8), offset)
    except (OSError, ValueError):
        pass


def merge(snapshots: Iterable[CellsSnapshot]) -> MergedCells:
    """Sum the histograms and gauges of every file; keep the most recent exemplar per bucket."""
    merged = MergedCells()
    for snap in snapshots:
        if merged.bounds is None:
            merged.bounds = snap.bounds
        elif snap.bounds != merged.bounds:
            log.warning("HTTP metrics: %s has other buckets than the rest; skipped", snap.identity)
            continue
        for labels, row in snap.histograms.items():
            total = merged.histograms.get(labels)
            if total is None:
                merged.histograms[labels] = list(row)
                merged.exemplars[labels] = list(snap.exemplars[labels])
            else:
                for i, value in enumerate(row):
                    total[i] += value
                best = merged.exemplars[labels]
                for i, exemplar in enumerate(snap.exemplars[labels]):
                    kept = best[i]
                    if exemplar is not None and (kept is None or exemplar.timestamp > kept.timestamp):
                        best[i] = exemplar
        for labels, value in snap.in_progress.items():
            merged.in_progress[labels] = merged.in_progress.get(labels, 0.0) + value
        merged.write_errors[snap.identity] = merged.write_errors.get(snap.identity, 0.0) + snap.write_errors
    return merged


@dataclass
class MergedCells:
    bounds: tuple[float, ...] | None = None
    histograms: dict[tuple[str, ...], list[float]] = field(default_factory=dict)
    exemplars: dict[tuple[str, ...], list[Exemplar | None]] = field(default_factory=dict)
    in_progress: dict[tuple[str, ...], float] = field(default_factory=dict)
    write_errors: dict[str, float] = field(default_factory=dict)
