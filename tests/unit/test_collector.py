"""MultiProcessDirCollector: same output as prometheus_client's collector, but robust to odd files."""

from __future__ import annotations

import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from gunicorn_prometheus import cells, shared_state
from gunicorn_prometheus.collector import METRIC_FILE_RE, MultiProcessDirCollector


def write(path: Path, entries: list[tuple[str, str, dict[str, str], float]], help_text: str = "h") -> None:
    """Write entries with prometheus_client's own file writer."""
    d = MmapedDict(str(path))
    for metric_name, name, labels, value in entries:
        d.write_value(mmap_key(metric_name, name, list(labels), list(labels.values()), help_text), value, 0.0)
    d.close()


def populate(directory: Path) -> None:
    for ident in ("1", "w0", "master"):
        write(directory / f"counter_{ident}.db", [("reqs", "reqs_total", {"path": "/a"}, 2.0)])
        write(
            directory / f"histogram_{ident}.db",
            [
                ("lat", "lat_bucket", {"le": "0.1"}, 1.0),
                ("lat", "lat_bucket", {"le": "+Inf"}, 2.0),
                ("lat", "lat_sum", {}, 3.5),
            ],
        )
        write(directory / f"gauge_livesum_{ident}.db", [("inprog", "inprog", {}, 1.0)])
        write(directory / f"gauge_all_{ident}.db", [("temp", "temp", {}, 5.0)])


def scrape(directory: Path) -> bytes:
    registry = CollectorRegistry()
    MultiProcessDirCollector(registry, str(directory))
    return generate_latest(registry)


def lines(text: bytes) -> list[bytes]:
    """Exposition lines, order-insensitive (upstream's order follows glob order, ours is sorted)."""
    return sorted(text.splitlines())


def upstream_scrape(directory: Path) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))
    return generate_latest(registry)


def test_same_output_as_upstream_on_clean_dir(tmp_path: Path) -> None:
    populate(tmp_path)
    ours = scrape(tmp_path)
    assert lines(ours) == lines(upstream_scrape(tmp_path))
    assert b'reqs_total{path="/a"} 6.0' in ours
    assert b'lat_bucket{le="+Inf"} 9.0' in ours
    assert b"lat_count 9.0" in ours
    assert b"inprog 3.0" in ours
    assert b'temp{pid="w0"} 5.0' in ours


def test_registers_itself_and_reads_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    registry = CollectorRegistry()
    collector = MultiProcessDirCollector(registry)
    assert collector.path == str(tmp_path)
    assert registry.get_sample_value("reqs_total", {"path": "/a"}) == 6.0


def test_requires_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ValueError):
        MultiProcessDirCollector(None)
    with pytest.raises(ValueError):
        MultiProcessDirCollector(None, str(tmp_path / "missing"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError):
        MultiProcessDirCollector(None, str(tmp_path / "a-file"), missing_ok=True)


def test_the_metrics_servers_collector_is_built_and_collects_after_the_directory_is_removed(
    tmp_path: Path,
) -> None:
    """A metrics peer may build its /metrics machinery after an `rm -rf` of the directory: it must still
    collect what does not live in files (here: its own process figures), not fail every scrape."""
    from gunicorn_prometheus.metrics_scrape import ServerCollector
    from gunicorn_prometheus.metrics_server import ServerView

    removed = str(tmp_path / "removed")
    collector = ServerCollector(removed, ServerView(removed, os.getpid()))
    names = {family.name for family in collector.collect()}
    assert "gunicorn_master_up" in names and collector.files_read == 0


@pytest.mark.parametrize(
    "name",
    [
        "counter_1.db",
        "counter_w12.db",
        "histogram_master.db",
        "summary_7.db",
        "gauge_all_3.db",
        "gauge_livesum_w0.db",
        "gauge_livemostrecent_w0.db",
    ],
)
def test_metric_file_names_accepted(name: str) -> None:
    assert METRIC_FILE_RE.fullmatch(name)


@pytest.mark.parametrize(
    "name",
    [
        "foo.db",
        ".lock",
        "state.json",
        "counter_.db",
        "counter_1.db.tmp",
        ".counter_1.db",
        "gauge_bogus_1.db",
        "gauge_1.db",
        "counters_1.db",
        "counter_1_2.db",
    ],
)
def test_other_file_names_rejected(name: str) -> None:
    assert not METRIC_FILE_RE.fullmatch(name)


def test_ignores_foreign_files(tmp_path: Path) -> None:
    populate(tmp_path)
    expected = scrape(tmp_path)
    (tmp_path / "foo.db").write_bytes(b"\x00garbage" * 100)
    (tmp_path / ".lock").write_bytes(b"")
    (tmp_path / "slots.json").write_text('{"w0": 1}')
    write(tmp_path / "gauge_bogus_1.db", [("bogus", "bogus", {}, 1.0)])
    (tmp_path / "subdir.db").mkdir()
    assert scrape(tmp_path) == expected


def test_empty_file_is_skipped(tmp_path: Path) -> None:
    """A worker SIGKILLed between creating and sizing its file leaves 0 bytes (client_python #1199)."""
    populate(tmp_path)
    expected = scrape(tmp_path)
    (tmp_path / "counter_99.db").write_bytes(b"")
    (tmp_path / "histogram_99.db").write_bytes(b"")
    with pytest.raises(struct.error):  # the upstream failure this collector avoids
        upstream_scrape(tmp_path)
    assert scrape(tmp_path) == expected


def test_sized_but_never_written_file_is_empty_not_an_error(tmp_path: Path) -> None:
    """Killed after truncate() but before the header write: 64 KiB of zeros."""
    populate(tmp_path)
    expected = scrape(tmp_path)
    (tmp_path / "counter_98.db").write_bytes(b"\0" * 65536)
    assert scrape(tmp_path) == expected


def _valid_bytes(tmp_path: Path) -> bytes:
    src = tmp_path / "src" / "counter_5.db"
    src.parent.mkdir()
    write(src, [("reqs", "reqs_total", {"path": "/a"}, 1.0), ("reqs", "reqs_total", {"path": "/b"}, 2.0)])
    return src.read_bytes()


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b[:3], id="shorter-than-header"),
        pytest.param(lambda b: struct.pack("i", 10_000_000) + b[4:], id="used-beyond-file"),
        pytest.param(lambda b: b[:12] + b"\xff\xfe{{" + b[16:], id="bad-key-bytes"),
        pytest.param(lambda b: b[:8] + struct.pack("i", -28) + b[12:], id="negative-length-loop"),
        pytest.param(lambda b: b[:8] + struct.pack("i", 100_000) + b[12:], id="length-beyond-used"),
        pytest.param(lambda b: b[: struct.unpack_from("i", b)[0] - 10], id="torn-tail"),
    ],
)
def test_corrupt_file_is_skipped_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mutate
) -> None:
    bad = mutate(_valid_bytes(tmp_path))
    populate(tmp_path)
    registry = CollectorRegistry()
    MultiProcessDirCollector(registry, str(tmp_path))
    expected = generate_latest(registry)
    (tmp_path / "counter_5.db").write_bytes(bad)
    with caplog.at_level(logging.WARNING, logger="gunicorn_prometheus.collector"):
        assert generate_latest(registry) == expected
        assert generate_latest(registry) == expected
    assert len([r for r in caplog.records if "counter_5.db" in r.getMessage()]) == 1


def test_key_of_wrong_shape_is_skipped(tmp_path: Path) -> None:
    populate(tmp_path)
    expected = scrape(tmp_path)
    d = MmapedDict(str(tmp_path / "counter_6.db"))
    d.write_value('["reqs", "reqs_total", ["not", "a", "dict"], "h"]', 1.0, 0.0)
    d.write_value('{"an": "object"}', 1.0, 0.0)
    d.close()
    assert scrape(tmp_path) == expected


def test_file_vanishing_between_listing_and_reading(tmp_path: Path) -> None:
    populate(tmp_path)
    collector = MultiProcessDirCollector(None, str(tmp_path))
    files = collector.metric_files()
    (tmp_path / "counter_1.db").unlink()
    (tmp_path / "gauge_livesum_w0.db").unlink()
    collector.metric_files = lambda: files  # type: ignore[method-assign]  # listed before they went
    metrics = {m.name: m for m in collector.app_metrics()}
    reqs = metrics["reqs"].samples
    assert [(s.name, s.value) for s in reqs] == [("reqs_total", 4.0)]


def test_file_vanishing_between_check_and_merge_is_read_again(tmp_path: Path) -> None:
    populate(tmp_path)
    collector = MultiProcessDirCollector(None, str(tmp_path))
    check = collector.readable

    def check_then_vanish(files):
        passed = check(files)
        (tmp_path / "counter_1.db").unlink(missing_ok=True)  # gone before prometheus_client's merge reads it
        return passed

    collector.readable = check_then_vanish  # type: ignore[method-assign]
    metrics = {m.name: m for m in collector.app_metrics()}
    assert [(s.name, s.value) for s in metrics["reqs"].samples] == [("reqs_total", 4.0)]


def test_directory_vanishing_gives_empty_scrape(tmp_path: Path) -> None:
    d = tmp_path / "mp"
    d.mkdir()
    collector = MultiProcessDirCollector(None, str(d))
    d.rmdir()
    assert list(collector.collect()) == []


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_damage_never_breaks_a_scrape(tmp_path_factory: pytest.TempPathFactory, data) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    valid = _valid_bytes(tmp)
    used = struct.unpack_from("i", valid)[0]
    raw = bytearray(valid[: data.draw(st.integers(0, used + 64), label="cut")])
    for _ in range(data.draw(st.integers(0, 6), label="flips")):
        if raw:
            pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
            raw[pos] = data.draw(st.integers(0, 255), label="byte")
    good = tmp / "counter_1.db"
    write(good, [("reqs", "reqs_total", {"path": "/a"}, 3.0)])
    (tmp / "counter_2.db").write_bytes(bytes(raw))
    registry = CollectorRegistry()
    MultiProcessDirCollector(registry, str(tmp))
    generate_latest(registry)  # must neither raise nor hang


BOUNDS = (0.1, 1.0)


def _observe(writer: cells.CellsWriter, n: int) -> None:
    row = writer.histogram(("GET", "/a", "200", "app"))
    for _ in range(n):
        row.cells[row.base] += 0.05
        row.cells[row.base + 1] += 1


def _count(collector: MultiProcessDirCollector) -> float:
    return sum(
        sample.value
        for family in collector.http_metrics()
        for sample in family.samples
        if sample.name == "starlette_request_duration_seconds_count"
    )


@pytest.fixture
def held_dir(tmp_path: Path):
    """A multiprocess directory with a table whose master is this process, and the master's w0 file."""
    directory = tmp_path / "mp"
    (directory / shared_state.STATE_DIR).mkdir(parents=True)
    shared_state.forget(directory)
    table = shared_state.create(directory)
    table.write_server(shared_state.ServerRecord(master_pid=os.getpid()))
    held = cells.CellsWriter.hold(BOUNDS, str(directory), "w0")
    table.write_held_cells(0, shared_state.HeldCellsRecord(held, os.fstat(held).st_ino))
    cells.give(str(directory), "w0", os.dup(held))
    writer = cells.CellsWriter(BOUNDS, str(directory), "w0")
    yield directory, table, writer
    writer.close()
    os.close(held)
    shared_state.forget(directory)


def test_held_files_are_read_through_the_masters_descriptor_once_and_after_an_rm_rf(held_dir) -> None:
    directory, _, writer = held_dir
    _observe(writer, 3)
    other = cells.CellsWriter(BOUNDS, str(directory), "w1")  # not held: read by its name
    _observe(other, 1)
    collector = MultiProcessDirCollector(None, str(directory))
    assert _count(collector) == 4  # w0 is in the directory too: read once
    assert collector.cell_files_read == 2
    opened = collector.held_cells._open[0][1]
    shutil.rmtree(directory)
    _observe(writer, 2)
    assert _count(collector) == 5  # w0 through the master's descriptor; w1 went with the directory
    assert collector.held_cells._open[0][1] == opened  # opened once, kept
    assert collector.read_errors == 0
    collector.held_cells.close()
    other.close()


def test_a_held_file_the_table_names_anew_is_opened_anew(held_dir) -> None:
    directory, table, writer = held_dir
    _observe(writer, 3)
    collector = MultiProcessDirCollector(None, str(directory))
    assert _count(collector) == 3
    os.unlink(directory / cells.file_name("w0"))
    replacement = cells.CellsWriter.hold(BOUNDS, str(directory), "w0")  # another file for the slot
    table.write_held_cells(0, shared_state.HeldCellsRecord(replacement, os.fstat(replacement).st_ino))
    assert _count(collector) == 0
    table.write_held_cells(0, shared_state.HeldCellsRecord())  # none held any more: by name
    os.close(replacement)
    assert _count(collector) == 0 and collector.held_cells._open == {}


def test_held_files_that_cannot_be_opened_are_read_by_name_and_logged_once(held_dir, caplog) -> None:
    directory, table, writer = held_dir
    _observe(writer, 3)
    table.write_held_cells(0, shared_state.HeldCellsRecord(fd=2**20, inode=1))  # no such descriptor
    collector = MultiProcessDirCollector(None, str(directory))
    with caplog.at_level(logging.WARNING):
        assert _count(collector) == 3 and _count(collector) == 3
    assert collector.read_errors == 0
    logged = [r for r in caplog.records if "cannot open the HTTP metrics files the master holds" in r.message]
    assert len(logged) == 1
