"""Stable worker slots: slot bookkeeping and per-slot prometheus_client file identity."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.mmap_dict import MmapedDict

from gunicorn_prometheus import slots
from gunicorn_prometheus.collector import MultiProcessDirCollector
from gunicorn_prometheus.slots import (
    SlotTable,
    clear_slot_live_gauges,
    current_identity,
    install_identity,
    set_identity,
    slot_identity,
)


@pytest.fixture
def mpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh multiprocess dir; prometheus_client's value class and our identity restored afterwards."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)
    monkeypatch.setattr(slots, "_identity", None)
    return tmp_path


def in_child(fn: Callable[[], None]) -> None:
    """Run fn in a forked child (a stand-in for a gunicorn worker) and fail if it failed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float | None:
    return registry.get_sample_value(name, labels or {})


# --- SlotTable -------------------------------------------------------------------------------------------


def test_acquire_gives_lowest_free_slot() -> None:
    table = SlotTable()
    assert [table.acquire(t) for t in "abc"] == [0, 1, 2]
    assert table.release(1)
    assert table.acquire("d") == 1
    assert table.acquire("e") == 3
    assert table.held == frozenset({0, 1, 2, 3})
    assert len(table) == 4 and 2 in table and 7 not in table


def test_release_unknown_slot_is_harmless() -> None:
    table = SlotTable()
    slot = table.acquire(1234)
    assert table.release(slot)
    assert not table.release(slot)
    assert not table.release(99)
    assert table.held == frozenset()


def test_holder_lookup() -> None:
    table = SlotTable()
    token = object()
    slot = table.acquire(token)
    assert table.holder(slot) is token
    assert table.slot_of(token) == slot
    assert table.holder(5) is None and table.slot_of("nobody") is None


def test_reload_overlap_uses_other_slots_until_old_ones_are_reaped() -> None:
    table = SlotTable()
    old = [table.acquire(f"old{i}") for i in range(4)]
    new = [table.acquire(f"new{i}") for i in range(4)]  # reload: old still held (not reaped yet)
    assert old == [0, 1, 2, 3] and new == [4, 5, 6, 7]
    for slot in old:
        table.release(slot)
    assert table.acquire("next") == 0


# --- identities ------------------------------------------------------------------------------------------


def test_slot_identity() -> None:
    assert slot_identity(0) == "w0"
    assert slot_identity(12) == "w12"
    with pytest.raises(ValueError):
        slot_identity(-1)


def test_current_identity_falls_back_to_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots, "_identity", None)
    assert current_identity() == str(os.getpid())
    set_identity("master")
    assert current_identity() == "master"


@pytest.mark.parametrize("bad", ["", "w_1", "a/b", "w 1", "ü"])
def test_set_identity_rejects_names_that_break_file_names(bad: str) -> None:
    with pytest.raises(ValueError):
        set_identity(bad)


def test_forked_child_without_own_identity_uses_its_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker forked before post_fork (or an app subprocess) must not write into its parent's files."""
    monkeypatch.setattr(slots, "_identity", None)
    set_identity("master")

    def child() -> None:
        assert current_identity() == str(os.getpid())
        set_identity("w0")
        assert current_identity() == "w0"

    in_child(child)
    assert current_identity() == "master"


def test_install_identity_requires_multiproc_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)
    with pytest.raises(RuntimeError):
        install_identity()
    assert values.ValueClass is values.MutexValue


def test_install_identity_is_idempotent(mpdir: Path) -> None:
    cls = install_identity()
    assert values.ValueClass is cls
    assert install_identity() is cls


def test_install_identity_warns_about_metrics_created_before(mpdir: Path) -> None:
    from prometheus_client import REGISTRY

    early = Counter("created_too_early", "x")
    try:
        with pytest.warns(RuntimeWarning, match="before install_identity"):
            install_identity()
    finally:
        REGISTRY.unregister(early)


def test_files_are_named_by_identity(mpdir: Path) -> None:
    install_identity()
    set_identity("master")
    c = Counter("reqs", "requests", registry=None)
    c.inc()
    assert (mpdir / "counter_master.db").exists()
    set_identity(slot_identity(3))
    c.inc(2)
    assert (mpdir / "counter_w3.db").exists()
    assert not list(mpdir.glob(f"*_{os.getpid()}.db"))
    registry = CollectorRegistry()
    MultiProcessDirCollector(registry, str(mpdir))
    assert sample(registry, "reqs_total") == 3


def test_replacement_worker_continues_predecessor_values(mpdir: Path) -> None:
    """The core of issue 4: a new holder of a slot continues counters/histograms; no new files appear."""
    install_identity()
    set_identity("master")
    # Created in the master before fork, like a preloaded app; children reset on first use.
    c = Counter("reqs", "requests", ["path"], registry=None)
    h = Histogram("lat", "latency", ["path"], buckets=(0.1, 1.0), registry=None)

    def worker(expected_before: float) -> Callable[[], None]:
        def run() -> None:
            set_identity(slot_identity(0))
            assert c.labels("/a")._value.get() == expected_before
            c.labels("/a").inc()
            h.labels("/a").observe(0.5)

        return run

    for generation in range(5):
        in_child(worker(float(generation)))

    assert sorted(p.name for p in mpdir.iterdir()) == ["counter_w0.db", "histogram_w0.db"]
    registry = CollectorRegistry()
    MultiProcessDirCollector(registry, str(mpdir))
    assert sample(registry, "reqs_total", {"path": "/a"}) == 5
    assert sample(registry, "lat_bucket", {"path": "/a", "le": "0.1"}) == 0
    assert sample(registry, "lat_bucket", {"path": "/a", "le": "1.0"}) == 5
    assert sample(registry, "lat_count", {"path": "/a"}) == 5


def test_all_mode_gauge_carries_stable_slot_label(mpdir: Path) -> None:
    install_identity()
    set_identity("master")
    g = Gauge("temp", "t", multiprocess_mode="all", registry=None)

    def worker(value: float) -> Callable[[], None]:
        def run() -> None:
            set_identity(slot_identity(2))
            g.set(value)

        return run

    in_child(worker(1.0))
    in_child(worker(7.0))
    registry = CollectorRegistry()
    MultiProcessDirCollector(registry, str(mpdir))
    assert sample(registry, "temp", {"pid": "w2"}) == 7.0
    assert sample(registry, "temp", {"pid": "master"}) == 0.0
    assert sorted(p.name for p in mpdir.iterdir()) == ["gauge_all_master.db", "gauge_all_w2.db"]


def test_clear_slot_live_gauges_removes_only_that_slots_live_gauges(mpdir: Path) -> None:
    names = [
        "gauge_livesum_w1.db",
        "gauge_liveall_w1.db",
        "gauge_livemostrecent_w1.db",
        "gauge_livesum_w10.db",
        "gauge_livesum_w2.db",
        "gauge_all_w1.db",
        "counter_w1.db",
        "histogram_w1.db",
    ]
    for name in names:
        MmapedDict(str(mpdir / name)).close()
    clear_slot_live_gauges(mpdir, 1)
    assert sorted(p.name for p in mpdir.iterdir()) == sorted(
        ["gauge_livesum_w10.db", "gauge_livesum_w2.db", "gauge_all_w1.db", "counter_w1.db", "histogram_w1.db"]
    )
    clear_slot_live_gauges(mpdir, 1)  # nothing left to remove: no error


def test_live_gauge_restarts_from_zero_after_clear(mpdir: Path) -> None:
    install_identity()
    set_identity("master")
    g = Gauge("inprog", "in progress", multiprocess_mode="livesum", registry=None)

    def stuck_worker() -> None:  # dies mid-request: its gauge stays at 1
        set_identity(slot_identity(0))
        g.inc()

    in_child(stuck_worker)
    registry = CollectorRegistry()
    MultiProcessDirCollector(registry, str(mpdir))
    assert sample(registry, "inprog") == 1
    clear_slot_live_gauges(mpdir, 0)  # master: after reaping, before reusing slot 0
    assert sample(registry, "inprog") == 0  # only the master's own (zero) gauge is left
    assert not (mpdir / "gauge_livesum_w0.db").exists()

    def successor() -> None:
        set_identity(slot_identity(0))
        assert g._value.get() == 0
        g.inc()

    in_child(successor)
    assert sample(registry, "inprog") == 1
