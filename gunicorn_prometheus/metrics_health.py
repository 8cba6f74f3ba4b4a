"""The metrics server's own health, as served on /metrics: what the previous scrape cost and what failed.

Two peer processes answer scrapes (see metrics_process) and either may be replaced at any time, so these
figures cannot live in one process's memory: Prometheus would see the read-error counter jump between
two values, or fall to zero after a restart. They live in one small file in the state directory instead,
updated under a lock after every scrape; a counter there only ever grows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import names

HEALTH_FILE = "metrics-health.json"
LOCK_FILE = "metrics-health.lock"


@dataclass
class Health:
    scrape_duration: float = 0.0  # seconds the previous scrape took to collect (this one's is not known yet)
    files: int = 0  # metric files this scrape read
    series: int = 0  # samples this scrape collected, not counting these
    read_errors: int = 0  # files skipped as unreadable, all scrapes since start

    def families(self) -> Iterator[Metric]:
        for name, doc, value in (
            (
                names.METRICS_SCRAPE_DURATION,
                "Seconds the previous scrape of this server took to collect.",
                self.scrape_duration,
            ),
            (names.METRICS_FILES, "Metric files read by this scrape.", self.files),
            (
                names.METRICS_SERIES,
                "Samples collected by this scrape, besides this server's own.",
                self.series,
            ),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        errors = CounterMetricFamily(
            names.METRICS_READ_ERRORS, "Metric files skipped as unreadable (missing, truncated, corrupt)."
        )
        errors.add_metric([], self.read_errors)
        yield errors


class HealthFile:
    """The shared record in the state directory; every method tolerates the directory being gone."""

    def __init__(self, state: Path) -> None:
        self.path = state / HEALTH_FILE
        self.lock_path = state / LOCK_FILE

    def read(self) -> Health:
        try:
            data = json.loads(self.path.read_text())
            return Health(**{k: data[k] for k in asdict(Health()) if k in data})
        except (OSError, ValueError, TypeError):
            return Health()

    def record(self, *, duration: float, files: int, series: int, new_read_errors: int) -> Health:
        """Store this scrape's figures and add its read errors; return what this scrape serves."""
        with self._locked():
            previous = self.read()
            current = Health(duration, files, series, previous.read_errors + new_read_errors)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(asdict(current)))
                os.replace(tmp, self.path)
        return Health(previous.scrape_duration, files, series, current.read_errors)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            yield  # directory gone (server stopping): nothing to protect
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
