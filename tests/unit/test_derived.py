"""derive_request_totals: starlette_requests_total from the duration histogram's _count, at scrape time."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from gunicorn_prometheus import names
from gunicorn_prometheus.derived import (
    DerivedCollector,
    derive_request_totals,
    request_totals,
    with_stalls_in_progress,
)
from tests.support.child import run_python

LABELS = ["method", "path", "status_code", "app_name"]


def families_with_requests() -> tuple[CollectorRegistry, list[Metric]]:
    registry = CollectorRegistry()
    duration = Histogram("starlette_request_duration_seconds", "d", LABELS, registry=registry)
    for value in (0.01, 0.2, 3.0):
        duration.labels("GET", "/items/{item_id}", "200", "app").observe(value)
    duration.labels("POST", "__unknown__", "404", "app").observe(0.001)
    Gauge("starlette_requests_in_progress", "g", ["method", "app_name"], registry=registry)
    return registry, list(registry.collect())


def totals(families: list[Metric]) -> dict[tuple[str, ...], float]:
    return {
        tuple(sample.labels[name] for name in LABELS): sample.value
        for family in families
        if family.name == "starlette_requests"
        for sample in family.samples
        if sample.name == "starlette_requests_total"
    }


def test_counter_family_with_histogram_counts_and_labels():
    _, families = families_with_requests()
    derived = derive_request_totals(families)
    assert derived[: len(families)] == families  # the input is passed on unchanged
    (counter,) = [f for f in derived if f.name == "starlette_requests"]
    assert counter.type == "counter"
    assert {s.name for s in counter.samples} == {"starlette_requests_total"}
    assert totals(derived) == {
        ("GET", "/items/{item_id}", "200", "app"): 3.0,
        ("POST", "__unknown__", "404", "app"): 1.0,
    }


def test_exposition_is_starlette_exporters():
    registry, _ = families_with_requests()
    wrapped = CollectorRegistry()
    wrapped.register(DerivedCollector(registry))
    text = generate_latest(wrapped).decode()
    assert "# TYPE starlette_requests_total counter" in text
    assert "# HELP starlette_requests_total Total HTTP requests" in text
    assert (
        'starlette_requests_total{app_name="app",method="GET",path="/items/{item_id}",status_code="200"} 3.0'
        in text
    )


def test_nothing_to_derive_without_the_histogram():
    registry = CollectorRegistry()
    Gauge("other", "g", registry=registry)
    families = list(registry.collect())
    assert derive_request_totals(families) == families


def test_an_existing_counter_is_left_alone():
    registry, _ = families_with_requests()
    Counter("starlette_requests", "from the app itself", LABELS, registry=registry).labels(
        "GET", "/", "200", "app"
    ).inc(7)
    families = list(registry.collect())
    derived = derive_request_totals(families)
    assert derived == families
    assert totals(derived) == {("GET", "/", "200", "app"): 7.0}


def test_empty_histogram_gives_an_empty_counter():
    registry = CollectorRegistry()
    Histogram("starlette_request_duration_seconds", "d", LABELS, registry=registry)
    (family,) = registry.collect()
    assert request_totals(family).samples == []


def test_accepts_any_iterable_once():
    _, families = families_with_requests()
    assert totals(derive_request_totals(iter(families))) == totals(derive_request_totals(families))


def test_on_multiprocess_collector_output(tmp_path: Path):
    """Two 'workers' write histogram files; the aggregated _count becomes the counter."""
    directory = tmp_path / "mp"
    directory.mkdir()
    worker = """
        from prometheus_client import Histogram
        labels = ["method", "path", "status_code", "app_name"]
        h = Histogram("starlette_request_duration_seconds", "d", labels)
        for _ in range(3):
            h.labels("GET", "/a", "200", "app").observe(0.1)
        """
    for _ in range(2):
        run_python(worker, multiproc_dir=directory)
    reader = """
        import sys
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        from gunicorn_prometheus.derived import DerivedCollector
        registry = CollectorRegistry()
        registry.register(DerivedCollector(MultiProcessCollector(None, sys.argv[1])))
        print(generate_latest(registry).decode())
        """
    out = run_python(reader, str(directory), multiproc_dir=directory)
    assert 'starlette_requests_total{app_name="app",method="GET",path="/a",status_code="200"} 6.0' in out


def lag_max_families(values: dict[str, float]) -> list[Metric]:
    registry = CollectorRegistry()
    gauge = Gauge(names.EVENT_LOOP_LAG_MAX, "worst lag", ["process"], registry=registry)
    for process, value in values.items():
        gauge.labels(process).set(value)
    return list(registry.collect())


def lag_max(families: list[Metric]) -> dict[str, float]:
    (family,) = [f for f in families if f.name == names.EVENT_LOOP_LAG_MAX]
    return {sample.labels["process"]: sample.value for sample in family.samples}


def test_a_stall_in_progress_raises_the_worst_lag_of_its_worker_only():
    now = 1000.0
    workers = {
        0: {"pid": 10, "serving": True, "loop_due": now - 2.5},  # stalled for 2.5 s so far
        1: {"pid": 11, "serving": True, "loop_due": now + 0.05},  # its timer is not due yet: healthy
        2: {"pid": 12, "serving": True, "loop_due": 0.0},  # no timer armed (not started, or exited)
        3: {"pid": 13, "serving": False, "loop_due": now - 9.0},  # still booting: not a stall
        4: {"pid": 14, "serving": True, "loop_due": now - 0.2},  # late, but less than its recorded worst
    }
    recorded = {"w0": 0.004, "w1": 0.003, "w2": 0.002, "w3": 0.001, "w4": 0.9}
    families = with_stalls_in_progress(lag_max_families(recorded), workers, now)
    assert lag_max(families) == {**recorded, "w0": 2.5}


def test_no_stall_leaves_the_families_as_they_were():
    families = lag_max_families({"w0": 0.01})
    workers = {0: {"pid": 10, "serving": True, "loop_due": 5.0}}
    assert lag_max(with_stalls_in_progress(families, workers, 4.0)) == {"w0": 0.01}
    assert with_stalls_in_progress([], workers, 6.0) == []  # no gauge yet: nothing to raise
