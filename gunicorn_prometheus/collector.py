"""A MultiProcessCollector that survives what real multiprocess directories contain.

prometheus_client's ``MultiProcessCollector`` globs ``*.db`` and raises out of the whole scrape on any
unreadable file: a 0-byte file left by a worker killed between creating and sizing it (client_python
#1199), a foreign ``*.db`` in the directory (#878), or a non-live file deleted between glob and read. One
bad file then hides every metric. This collector reads only files named the way prometheus_client names
them and skips (and logs once) any file it cannot read completely, so a scrape always succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics import Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger(__name__)

_TYPED_PREFIXES = ("counter", "histogram", "summary") + tuple(
    f"gauge_{mode}" for mode in sorted(Gauge._MULTIPROC_MODES)
)
# <prefix>_<identity>.db exactly as MmapedValue names files; identity is a pid or a slot name like "w3"
# (no "_": prometheus_client's own parsing splits on it).
METRIC_FILE_RE = re.compile(
    r"(?P<prefix>" + "|".join(map(re.escape, _TYPED_PREFIXES)) + r")_(?P<identity>[A-Za-z0-9.-]+)\.db"
)

# What reading or decoding a damaged file can raise (struct on short data, RuntimeError from mmap_dict's
# own bounds check, JSON/UTF-8 errors, malformed key shapes).
_CORRUPT_ERRORS = (struct.error, RuntimeError, ValueError, TypeError, AttributeError, KeyError)

# Distinct series keys to remember between scrapes before starting over (a few MB at most).
_KEY_CACHE_LIMIT = 100_000

_Entry = tuple[tuple[str, str, tuple[tuple[str, str], ...], str], float, float]


class MultiProcessDirCollector(Collector):
    """Collect the aggregated metrics of a prometheus_client multiprocess directory.

    Same output as ``MultiProcessCollector`` (it reuses its accumulation step), but ignores files whose
    names are not metric files and skips files that are missing, empty or corrupt instead of failing.
    """

    def __init__(self, registry: CollectorRegistry | None, path: str | os.PathLike[str] | None = None):
        if path is None:
            path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path or not os.path.isdir(path):
            raise ValueError("env PROMETHEUS_MULTIPROC_DIR is not set or not a directory")
        self._path = os.fspath(path)
        # Files already reported as unreadable: a corrupt file would otherwise log on every scrape.
        self._reported: set[str] = set()
        # Decoded entry keys, kept across scrapes: the same series appear in every scrape, and decoding
        # their JSON is a large share of the scrape cost. Bounded by _KEY_CACHE_LIMIT.
        self._key_cache: dict[str, Any] = {}
        self.read_errors = 0  # files skipped as unreadable, every time (the metrics server's own health)
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
        return self.merge(self.metric_files())

    def merge(self, files: Iterable[str], accumulate: bool = True) -> Iterable[Metric]:
        """Merge the given metric files like ``MultiProcessCollector.merge``, skipping unreadable ones."""
        metrics = self._read_metrics(files)
        # Reused as is: the cross-process combination rules (gauge modes, histogram bucket accumulation)
        # are prometheus_client's and must stay identical to its own collector's.
        return MultiProcessCollector._accumulate_metrics(metrics, accumulate)

    def _read_metrics(self, files: Iterable[str]) -> dict[str, Metric]:
        # Hand-written counterpart of MultiProcessCollector._read_metrics: upstream parses each file
        # lazily while adding samples, so a file that turns out bad half-way has already been partly
        # merged and the exception escapes. Here each file is read and decoded completely first and
        # only then merged, or skipped as a whole.
        metrics: dict[str, Metric] = {}
        key_cache = self._key_cache
        if len(key_cache) > _KEY_CACHE_LIMIT:
            key_cache.clear()
        for path in files:
            match = METRIC_FILE_RE.fullmatch(os.path.basename(path))
            if match is None:
                continue
            entries = self._read_file(path, key_cache)
            if entries is None:
                continue
            prefix, identity = match["prefix"], match["identity"]
            typ, _, mode = prefix.partition("_")
            for (metric_name, name, labels_key, help_text), value, timestamp in entries:
                metric = metrics.get(metric_name)
                if metric is None:
                    metric = metrics[metric_name] = Metric(metric_name, help_text, typ)
                # As prometheus_client's MultiProcessCollector does: labels travel as sorted tuples and the
                # gauge mode as an attribute until _accumulate_metrics turns them into dicts and merges.
                if typ == "gauge":
                    metric._multiprocess_mode = mode  # type: ignore[attr-defined]
                    metric.add_sample(name, labels_key + (("pid", identity),), value, timestamp)  # type: ignore[arg-type]
                else:
                    # Duplicates across files and the label tuples are resolved by _accumulate_metrics.
                    metric.add_sample(name, labels_key, value)  # type: ignore[arg-type]
        return metrics

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
