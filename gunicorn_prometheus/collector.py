"""Everything the multiprocess directory holds, aggregated: the app's metrics and our HTTP cells.

App metrics (prometheus_client's files): ``MultiProcessCollector`` globs ``*.db`` and raises out of the
whole scrape on any unreadable file: a 0-byte file left by a worker killed between creating and sizing it
(client_python #1199), a foreign ``*.db`` in the directory (#878), or a non-live file deleted between glob
and read. One bad file then hides every metric. This collector reads only files named the way
prometheus_client names them, reads each one completely first and skips (and logs once) any it cannot,
then hands the files that passed to prometheus_client's public ``MultiProcessCollector.merge``, so the
cross-process rules (gauge modes, bucket accumulation) stay prometheus_client's own.

HTTP metrics (:mod:`gunicorn_prometheus.cells`): summed over every slot's file, served with
starlette_exporter's names, plus the requests that could not be stored by label, per process. The files
the master holds open for its slots (named in the shared table) are read through
``/proc/<master pid>/fd/<n>``, opened once per file and kept open, so an ``rm -rf`` of the directory
hides none of them; files in the directory that the master does not hold (single-process use, a master
that could not hold one) are read by name, and no file is read twice (same device and inode). Where
``/proc`` cannot be opened (another uid, no procfs), the held files are read by name instead (logged once).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from . import cells, names, shared_state

log = logging.getLogger(__name__)

# The multiprocess_mode values prometheus_client documents for Gauge (its README, "Multiprocess Mode"):
# a gauge file is named gauge_<mode>_<identity>.db.
GAUGE_MODES = (
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent",
)  # fmt: skip
# <prefix>_<identity>.db exactly as MmapedValue names files; identity is a pid or a slot name like "w3"
# (no "_": prometheus_client's own parsing splits on it).
METRIC_FILE_RE = re.compile(
    r"(?P<prefix>counter|histogram|summary|gauge_(?:" + "|".join(GAUGE_MODES) + r"))"
    r"_(?P<identity>[A-Za-z0-9.-]+)\.db"
)

DURATION_HELP = "HTTP request duration, in seconds"  # starlette_exporter's help texts
IN_PROGRESS_HELP = "Total HTTP requests currently in progress"
WRITE_ERRORS_HELP = (
    "HTTP requests a process could not count by label because the metrics directory was full or "
    "unwritable (see the worker's log)."
)
# merge() reads the files again; one that changes between our check and its read (e.g. deleted by a clean
# stop) makes it raise: check again, this many times, before serving the HTTP metrics alone.
_MERGE_ATTEMPTS = 3

# What reading or decoding a damaged file can raise (struct on short data, RuntimeError from mmap_dict's
# own bounds check, JSON/UTF-8 errors, malformed key shapes).
_CORRUPT_ERRORS = (struct.error, RuntimeError, ValueError, TypeError, AttributeError, KeyError)

# Distinct series keys to remember between scrapes before starting over (a few MB at most).
_KEY_CACHE_LIMIT = 100_000

_Entry = tuple[tuple[str, str, tuple[tuple[str, str], ...], str], float, float]

#: (where, the snapshot or None, why not) of one HTTP cells file
_CellsRead = tuple[str, cells.CellsSnapshot | None, str]
#: a held file open here: (what the table named: master pid, fd, inode bits), our descriptor, (device, inode)
_Held = tuple[tuple[int, int, int], int, tuple[int, int]]


class HeldCells:
    """The HTTP cells files the master holds open, opened here through ``/proc/<master pid>/fd/<n>``.

    One descriptor per slot, kept until the table names another file for the slot (another master pid,
    descriptor or inode): bounded by the slots. Not thread-safe: the caller serializes.
    """

    def __init__(self) -> None:
        self._open: dict[int, _Held] = {}  # by slot
        self._logged = False

    def files(self, table: shared_state.Table | None) -> list[tuple[str, int, tuple[int, int]]]:
        """(identity, our descriptor, (device, inode)) of every held file that could be opened."""
        named = {}
        master = table.server().master_pid if table is not None else 0
        if table is not None and master > 0:
            named = table.all_held_cells()
        for slot in [slot for slot in self._open if slot not in named]:
            os.close(self._open.pop(slot)[1])
        found = []
        for slot, record in named.items():
            want = (master, record.fd, record.inode)
            entry = self._open.get(slot)
            if entry is not None and entry[0] != want:
                os.close(self._open.pop(slot)[1])
                entry = None
            if entry is None:
                entry = self._open_held(want)
                if entry is None:
                    continue  # read by its name, if it still has one
                self._open[slot] = entry
            found.append((shared_state.slot_name(slot), entry[1], entry[2]))
        return found

    def _open_held(self, want: tuple[int, int, int]) -> _Held | None:
        master, fd, inode = want
        path = f"/proc/{master}/fd/{fd}"
        try:
            ours = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            if not self._logged:
                self._logged = True
                log.warning(
                    "cannot open the HTTP metrics files the master holds (%s: %s); reading them by their "
                    "names instead, so an rm -rf of the metrics directory hides their counts",
                    path,
                    err.strerror or err,
                )
            return None
        try:
            found = os.fstat(ours)
        except OSError:
            found = None
        if found is None or not stat.S_ISREG(found.st_mode) or found.st_ino & 0xFFFFFFFF != inode:
            os.close(ours)  # the table is being rewritten, or the descriptor is something else now
            return None
        return want, ours, (found.st_dev, found.st_ino)

    def close(self) -> None:
        for _, fd, _ in self._open.values():
            os.close(fd)
        self._open = {}


class MultiProcessDirCollector(Collector):
    """Collect the aggregated metrics of a multiprocess directory: the app's and the HTTP cells.

    For the app's metrics, the same output as ``MultiProcessCollector``, but files whose names are not
    metric files are ignored and files that are missing, empty or corrupt are skipped instead of failing.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None,
        path: str | os.PathLike[str] | None = None,
        *,
        missing_ok: bool = False,
    ):
        """``missing_ok``: a directory that does not exist (yet, or any more) collects no files instead of
        failing here; the metrics server's, whose directory can be removed under a running server while
        /metrics must go on answering with what does not live in files."""
        if path is None:
            path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path or not (os.path.isdir(path) or (missing_ok and not os.path.exists(path))):
            raise ValueError("env PROMETHEUS_MULTIPROC_DIR is not set or not a directory")
        self._path = os.fspath(path)
        # Files already reported as unreadable: a corrupt file would otherwise log on every scrape.
        self._reported: set[str] = set()
        # HTTP families left out because the app exports its own under the name, already logged
        self._shadowed: set[str] = set()
        # Decoded entry keys, kept across scrapes: the same series appear in every scrape, and decoding
        # their JSON is a large share of the scrape cost. Bounded by _KEY_CACHE_LIMIT.
        self._key_cache: dict[str, Any] = {}
        self.read_errors = 0  # files skipped as unreadable, every time (the metrics server's own health)
        self.files_read = 0  # prometheus_client files merged by the last collect()
        self.cell_files_read = 0  # cells files read by the last collect()
        #: process -> requests its cells could not store by label (full directory), as of the last collect()
        self.http_write_errors: dict[str, float] = {}
        # The master's held cells files; /healthz reads them from the event loop while a scrape may be
        # collecting in the pool.
        self.held_cells = HeldCells()
        self._held_lock = threading.Lock()
        if registry:
            registry.register(self)

    @property
    def path(self) -> str:
        return self._path

    def metric_files(self) -> list[str]:
        """Paths of the files in the directory that prometheus_client would have written, sorted."""
        try:
            names = os.listdir(self._path)
        except FileNotFoundError:
            return []
        return [os.path.join(self._path, n) for n in sorted(names) if METRIC_FILE_RE.fullmatch(n)]

    def collect(self) -> Iterable[Metric]:
        """The app's metrics and the HTTP metrics; ``files_read`` and ``http_write_errors`` say more.

        An HTTP family the app also exports under the same name (an app that still runs its own
        starlette_exporter) is the app's: two families of one name make the exposition invalid, and
        adding them up would count those requests twice. Ours is left out (logged once).
        """
        app = self.app_metrics()
        yield from app
        taken = {family.name for family in app}
        for family in self.http_metrics():
            if family.name not in taken:
                yield family
            elif family.name not in self._shadowed:
                self._shadowed.add(family.name)
                log.warning(
                    "the app exports %s itself (its own starlette_exporter?): serving the app's, not ours; "
                    "METRICS_INSTRUMENT=false stops ours being recorded",
                    family.name,
                )

    def app_metrics(self) -> list[Metric]:
        """prometheus_client's files, merged by prometheus_client from those that read back completely."""
        for _ in range(_MERGE_ATTEMPTS):
            files = self.readable(self.metric_files())
            self.files_read = len(files)
            try:
                return list(MultiProcessCollector.merge(files, accumulate=True))
            except (OSError, *_CORRUPT_ERRORS) as exc:
                log.debug("a metrics file changed during the scrape, reading again: %r", exc)
        return []

    def readable(self, files: Iterable[str]) -> list[str]:
        """The metric files that exist and can be read and decoded completely, right now."""
        key_cache = self._key_cache
        if len(key_cache) > _KEY_CACHE_LIMIT:
            key_cache.clear()
        return [path for path in files if self._read_file(path, key_cache) is not None]

    def cell_files(self) -> list[tuple[str, str]]:
        return cells.cell_files(self._path)

    def http_write_errors_now(self) -> float:
        """The HTTP cells' write errors as their files hold them now (for /healthz, between scrapes)."""
        # unreadable files are left to a scrape, which counts and logs them as read errors
        return sum(snapshot.write_errors for _, snapshot, _ in self.read_cells() if snapshot is not None)

    def read_cells(self) -> list[_CellsRead]:
        """Every HTTP cells file now: first those the master holds, then the directory's others."""
        found: list[_CellsRead] = []
        held_keys = set()
        with self._held_lock:
            for identity, fd, key in self.held_cells.files(shared_state.open_table(self._path)):
                held_keys.add(key)
                found.append(_read_cells_fd(fd, identity, f"{identity} (held by the master)"))
        for path, identity in self.cell_files():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed since the listing (a clean stop): nothing to read
            except OSError as exc:
                found.append((path, None, repr(exc)))
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) not in held_keys:
                    found.append(_read_cells_fd(fd, identity, path, st.st_size))
            except OSError as exc:
                found.append((path, None, repr(exc)))
            finally:
                os.close(fd)
        return found

    def http_metrics(self) -> list[Metric]:
        """The HTTP families of every cells file; their write errors go to ``http_write_errors``."""
        snapshots = []
        for where, snapshot, reason in self.read_cells():
            if snapshot is None:
                if where.startswith(os.sep) and not os.path.exists(where):
                    continue  # removed while it was read (a clean stop): nothing to read
                self.read_errors += 1
                if where not in self._reported:
                    self._reported.add(where)
                    log.warning("skipping unreadable HTTP metrics file %s: %s", where, reason)
                continue
            snapshots.append(snapshot)
        self.cell_files_read = len(snapshots)
        if not snapshots:
            self.http_write_errors = {}
            return []
        merged = cells.merge(snapshots)
        self.http_write_errors = merged.write_errors
        return http_families(merged)

    def _read_file(self, path: str, key_cache: dict[str, Any]) -> list[_Entry] | None:
        """Fully read and decode one file; None if it vanished or cannot be read completely."""
        entries: list[_Entry] = []
        last_pos = -1
        try:
            for key, value, timestamp, pos in MmapedDict.read_all_values_from_file(path):
                # mmap_dict's reader trusts the length fields: a corrupt negative length can make it
                # yield the same position forever. Strictly increasing positions rule that out.
                if pos <= last_pos:
                    raise RuntimeError(f"entry offsets do not increase at {pos}, file is corrupted")
                last_pos = pos
                parsed = key_cache.get(key)
                if parsed is None:
                    parsed = _parse_key(key, key_cache)
                entries.append((parsed, value, timestamp))
        except FileNotFoundError:
            # Deleted between listing and reading (mark_process_dead, slot cleanup): nothing to merge.
            return None
        except (OSError, *_CORRUPT_ERRORS) as exc:
            self.read_errors += 1
            if path not in self._reported:
                self._reported.add(path)
                log.warning("skipping unreadable metrics file %s: %r", path, exc)
            return None
        return entries


def _read_cells_fd(fd: int, identity: str, where: str, size: int | None = None) -> _CellsRead:
    try:
        return where, cells.read_fd(fd, identity, size), "short, torn or not ours"
    except (OSError, ValueError) as exc:
        return where, None, repr(exc)


def _parse_key(key: str, cache: dict[str, Any]) -> Any:
    """Decode an entry key as upstream does, validating its shape so bad keys fail here, not later."""
    val = cache.get(key)
    if val is None:
        metric_name, name, labels, help_text = json.loads(key)
        if not (isinstance(metric_name, str) and isinstance(name, str) and isinstance(help_text, str)):
            raise ValueError("malformed metric key")
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ValueError("malformed metric labels")
        val = cache[key] = (metric_name, name, tuple(sorted(labels.items())), help_text)
    return val


def http_families(merged: cells.MergedCells) -> list[Metric]:
    """The HTTP metrics of the cells of every process, in starlette_exporter's names and labels.

    A bucket's exemplar is the most recent traced request that landed in it (``trace_id``, and
    ``span_id`` when known); only the OpenMetrics exposition shows exemplars.
    """
    duration = HistogramMetricFamily(names.REQUEST_DURATION, DURATION_HELP, labels=names.REQUEST_LABELS)
    les = [floatToGoString(b) for b in (*(merged.bounds or ()), float("inf"))]
    for labels, row in sorted(merged.histograms.items()):
        exemplars = merged.exemplars.get(labels) or [None] * len(les)
        buckets: list = []
        cumulative = 0.0
        for le, count, exemplar in zip(les, row[1:], exemplars, strict=True):
            cumulative += count
            if exemplar is None:
                buckets.append((le, cumulative))
            else:
                ids = {"trace_id": exemplar.trace_id}
                if exemplar.span_id:
                    ids["span_id"] = exemplar.span_id
                buckets.append((le, cumulative, Exemplar(ids, exemplar.value, exemplar.timestamp)))
        duration.add_metric(list(labels), buckets, row[0])
    in_progress = GaugeMetricFamily(
        names.REQUESTS_IN_PROGRESS, IN_PROGRESS_HELP, labels=names.IN_PROGRESS_LABELS
    )
    for labels, value in sorted(merged.in_progress.items()):
        in_progress.add_metric(list(labels), value)
    return [duration, in_progress]


def add_write_errors(families: Iterable[Metric], extra: dict[str, float]) -> Iterator[Metric]:
    """``families`` with ``extra`` (process -> count) added into the write-errors counter family.

    The HTTP cells count the requests they could not store by label; prometheus_client's guarded files
    count failed writes elsewhere (:mod:`gunicorn_prometheus.metric_files`). One family serves both, per
    process: the sum of two counters that never go down never goes down either.
    """
    pending = {process: value for process, value in extra.items() if value}
    for family in families:
        if family.name == names.METRICS_WRITE_ERRORS and pending:
            samples = []
            for sample in family.samples:
                added = pending.pop(sample.labels.get("process", ""), 0.0)
                samples.append(sample._replace(value=sample.value + added) if added else sample)
            family.samples = samples
            for process, value in sorted(pending.items()):
                family.add_sample(family.name + "_total", {"process": process}, value)
            pending = {}
        yield family
    if pending:
        errors = CounterMetricFamily(names.METRICS_WRITE_ERRORS, WRITE_ERRORS_HELP, labels=["process"])
        for process, value in sorted(pending.items()):
            errors.add_metric([process], value)
        yield errors
