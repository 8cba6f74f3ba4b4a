"""Metrics computed at scrape time instead of being written on every request.

``starlette_requests_total`` (starlette_exporter's request counter) counts exactly what the duration
histogram's ``_count`` counts, label set for label set, so workers do not write it (one multiprocess file
write per request saved, see :mod:`gunicorn_prometheus.instrumentation`); the metrics process adds it to
the aggregated families here. Pure functions over prometheus_client ``Metric`` objects: no I/O, no state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .instrumentation import REQUEST_DURATION, REQUESTS_TOTAL
from .names import EVENT_LOOP_LAG_MAX
from .shared_state import slot_name

log = logging.getLogger(__name__)

#: Family name of the derived counter (prometheus_client names counter families without ``_total``).
REQUESTS_FAMILY = REQUESTS_TOTAL.removesuffix("_total")
REQUESTS_HELP = "Total HTTP requests"  # starlette_exporter's help text


def request_totals(duration: Metric, name: str = REQUESTS_FAMILY) -> Metric:
    """A counter family with one ``<name>_total`` sample per label set of the histogram ``duration``.

    Its value is that label set's ``_count``; labels (method, path, status_code, app_name) are copied.
    """
    counter = Metric(name, REQUESTS_HELP, "counter")
    count_name = duration.name + "_count"
    for sample in duration.samples:
        if sample.name == count_name:
            counter.add_sample(name + "_total", dict(sample.labels), sample.value)
    return counter


def derive_request_totals(
    metric_families: Iterable[Metric],
    *,
    histogram: str = REQUEST_DURATION,
    counter: str = REQUESTS_FAMILY,
) -> list[Metric]:
    """Return the families given, plus the request counter derived from the duration histogram.

    Given the aggregated output of MultiProcessCollector (whose histograms carry ``_count`` per label
    set). If a family of the counter's name is already there (an app that still runs its own
    starlette_exporter, say), nothing is derived: two families of one name would make the exposition
    invalid, and adding them up would count those requests twice.
    """
    families = list(metric_families)
    names = {family.name for family in families}
    if counter in names or counter + "_total" in names:
        log.debug("%s already present: not derived", counter)
        return families
    for family in families:
        if family.name == histogram and family.type == "histogram":
            families.append(request_totals(family, counter))
            break
    return families


def with_stalls_in_progress(
    metric_families: list[Metric], workers: dict[int, dict], now: float
) -> list[Metric]:
    """Raise each serving worker's worst-lag sample to the stall of its event loop so far, if larger.

    A worker's loop timer reports a stall only once the loop runs again, so the worker publishes when
    its timer is due next (``loop_due``, on ``time.monotonic()``'s clock, in the shared table): past that,
    ``now - loop_due`` is how long the loop has not run its callbacks. Deriving it here costs the worker
    nothing (no thread to take its GIL) and is exact at the moment of the scrape. ``workers`` is
    :func:`gunicorn_prometheus.server_state.workers` (live workers only).
    """
    stalls = {
        slot_name(slot): now - info["loop_due"]
        for slot, info in workers.items()
        if info.get("serving") and 0.0 < info.get("loop_due", 0.0) < now
    }
    if not stalls:
        return metric_families
    for family in metric_families:
        if family.name == EVENT_LOOP_LAG_MAX:
            for index, sample in enumerate(family.samples):
                stall = stalls.get(sample.labels.get("process", ""))
                if stall is not None and stall > sample.value:
                    family.samples[index] = sample._replace(value=stall)
            break
    return metric_families


class DerivedCollector(Collector):
    """Wraps a collector (MultiProcessCollector, typically) and adds the derived families to its output.

    For registering in a CollectorRegistry that serves /metrics; ``derive_request_totals`` is the same
    thing for code that already holds the families.
    """

    def __init__(self, inner: Collector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        return iter(derive_request_totals(self.inner.collect()))
