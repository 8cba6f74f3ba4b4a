"""The cells file: round trip, continuation by the next holder, damage skipped, a full disk degrades."""

from __future__ import annotations

import errno
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from gunicorn_prometheus import cells
from gunicorn_prometheus.collector import MultiProcessDirCollector, add_write_errors

BOUNDS = (0.1, 0.5, 1.0)
LABELS = ("GET", "/a", "200", "app")
COUNT_A = 'starlette_request_duration_seconds_count{app_name="app",method="GET",path="/a",status_code="200"}'


def observe(row: cells.HistogramRow, duration: float) -> int:
    bucket = next((i for i, b in enumerate(BOUNDS) if duration <= b), len(BOUNDS))
    row.cells[row.base] += duration
    row.cells[row.base + 1 + bucket] += 1
    return bucket


def read(directory: Path, identity: str = "w0") -> cells.CellsSnapshot | None:
    return cells.read_file(str(directory / cells.file_name(identity)), identity)


def scrape(directory: Path, openmetrics: bool = False) -> str:
    registry = CollectorRegistry()
    MultiProcessDirCollector(registry, str(directory))
    return (generate_openmetrics if openmetrics else generate_latest)(registry).decode()


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    writer = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    row = writer.histogram(LABELS)
    for d in (0.05, 0.3, 0.3, 7.0):
        observe(row, d)
    gauge = writer.in_progress(("GET", "app"))
    gauge.cells[gauge.index] += 2
    snap = read(tmp_path)
    assert snap is not None
    assert snap.histograms == {LABELS: [pytest.approx(7.65), 1.0, 2.0, 0.0, 1.0]}
    assert snap.in_progress == {("GET", "app"): 2.0}
    assert snap.write_errors == 0.0


def test_the_next_holder_continues_counters_and_resets_in_progress(tmp_path: Path) -> None:
    first = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    observe(first.histogram(LABELS), 0.3)
    gauge = first.in_progress(("GET", "app"))
    gauge.cells[gauge.index] += 1  # killed mid-request
    for i in range(400):  # enough label sets for several chunks
        observe(first.histogram(("GET", f"/r{i}", "200", "app")), 0.05)
    second = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    observe(second.histogram(LABELS), 0.3)
    snap = read(tmp_path)
    assert snap is not None
    assert snap.histograms[LABELS][1:] == [0.0, 2.0, 0.0, 0.0]
    assert snap.in_progress == {("GET", "app"): 0.0}
    assert len(snap.histograms) == 401
    assert os.path.getsize(tmp_path / cells.file_name("w0")) > cells.chunk_bytes_for(len(BOUNDS))


def test_master_resets_in_progress_of_a_reaped_holder(tmp_path: Path) -> None:
    writer = cells.CellsWriter(BOUNDS, str(tmp_path), "w3")
    gauge = writer.in_progress(("POST", "app"))
    gauge.cells[gauge.index] += 5
    cells.reset_in_progress(str(tmp_path), "w3")
    snap = read(tmp_path, "w3")
    assert snap is not None and snap.in_progress == {("POST", "app"): 0.0}


def test_other_buckets_start_the_file_afresh(tmp_path: Path) -> None:
    observe(cells.CellsWriter(BOUNDS, str(tmp_path), "w0").histogram(LABELS), 0.3)
    writer = cells.CellsWriter((1.0, 2.0), str(tmp_path), "w0")
    writer.histogram(LABELS)
    snap = read(tmp_path)
    assert snap is not None and snap.bounds == (1.0, 2.0)


def test_files_are_summed_and_the_most_recent_exemplar_wins(tmp_path: Path) -> None:
    for identity, trace, when in (("w0", 0xA, 100.0), ("w1", 0xB, 200.0), ("w2", 0xC, 150.0)):
        writer = cells.CellsWriter(BOUNDS, str(tmp_path), identity)
        row = writer.histogram(LABELS)
        bucket = observe(row, 0.3)
        cells.write_exemplar(row, bucket, 0.3, when, 0, trace, 0x1)
    text = scrape(tmp_path, openmetrics=True)
    assert f"{COUNT_A} 3.0" in text
    (exemplar_line,) = [line for line in text.splitlines() if " # {" in line]
    assert 'le="0.5"' in exemplar_line
    assert f'trace_id="{0xB:032x}"' in exemplar_line and exemplar_line.endswith(" 200.0")
    assert "# {" not in scrape(tmp_path)  # the classic text format has no exemplars


def test_an_exemplar_being_written_is_not_read(tmp_path: Path) -> None:
    writer = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    row = writer.histogram(LABELS)
    cells.write_exemplar(row, 0, 0.05, 100.0, 1, 2, 3)
    row.words[row.exemplars] += 1  # odd sequence: a write in progress (or its writer was killed in it)
    snap = read(tmp_path)
    assert snap is not None and snap.exemplars[LABELS][0] is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:40],  # short
        lambda raw: b"NOTCELLS" + raw[8:],  # foreign magic
        lambda raw: raw[:8] + struct.pack("=I", 99) + raw[12:],  # unknown version
        lambda raw: raw[:16] + struct.pack("=Q", len(raw) + 8) + raw[24:],  # used beyond the file
        lambda raw: b"",  # empty
    ],
)
def test_torn_short_or_foreign_files_are_skipped(tmp_path: Path, damage, caplog) -> None:
    good = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    observe(good.histogram(LABELS), 0.3)
    bad = tmp_path / cells.file_name("w1")
    other = cells.CellsWriter(BOUNDS, str(tmp_path), "w1")
    observe(other.histogram(LABELS), 0.3)
    bad.write_bytes(damage(bad.read_bytes()))
    text = scrape(tmp_path)
    assert f"{COUNT_A} 1.0" in text
    assert "skipping unreadable HTTP metrics file" in caplog.text


def test_a_negative_counter_makes_the_file_foreign(tmp_path: Path) -> None:
    writer = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    row = writer.histogram(LABELS)
    row.cells[row.base + 1] = -1.0
    assert read(tmp_path) is None


def test_a_full_filesystem_degrades_to_the_overflow_row(tmp_path: Path, monkeypatch, caplog) -> None:
    writer = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    observe(writer.histogram(LABELS), 0.3)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cells, "_reserve", full)
    rows = [writer.histogram(("GET", f"/r{i}", "200", "app")) for i in range(400)]
    for row in rows:
        observe(row, 0.05)
    observe(writer.histogram(LABELS), 0.3)  # a label set stored before keeps counting by label
    assert caplog.text.count("cannot grow") == 1  # logged once, with the path and what to do
    assert str(tmp_path) in caplog.text and "--shm-size" in caplog.text
    snap = read(tmp_path)
    assert snap is not None
    assert snap.histograms[LABELS][1:] == [0.0, 2.0, 0.0, 0.0]
    stored = len(snap.histograms)
    assert 1 < stored < 401
    assert snap.write_errors == 401 - stored
    collector = MultiProcessDirCollector(None, str(tmp_path))
    list(collector.collect())
    assert collector.http_write_errors == {"w0": 401 - stored}


def test_write_errors_join_the_families_other_errors() -> None:
    from prometheus_client.core import CounterMetricFamily

    theirs = CounterMetricFamily("gunicorn_metrics_write_errors", "h", labels=["process"])
    theirs.add_metric(["master"], 1)
    theirs.add_metric(["w0"], 2)
    (family,) = add_write_errors([theirs], {"w0": 3.0, "w1": 4.0, "w2": 0.0})
    assert {s.labels["process"]: s.value for s in family.samples} == {"master": 1, "w0": 5, "w1": 4}
    (alone,) = add_write_errors([], {"w1": 4.0})
    assert [(s.name, s.labels, s.value) for s in alone.samples] == [
        ("gunicorn_metrics_write_errors_total", {"process": "w1"}, 4.0)
    ]


def test_an_unusable_directory_falls_back_to_memory(tmp_path: Path, caplog) -> None:
    missing = tmp_path / "gone"
    writer = cells.CellsWriter(BOUNDS, str(missing), "w0")
    observe(writer.histogram(LABELS), 0.3)
    assert writer.failed and "cannot create or open" in caplog.text


def _valid_bytes(directory: Path) -> bytes:
    writer = cells.CellsWriter(BOUNDS, str(directory), "w9")
    for i in range(3):
        row = writer.histogram(("GET", f"/r{i}", "200", "app"))
        cells.write_exemplar(row, observe(row, 0.3), 0.3, 1.0, 1, 2, 3)
    writer.in_progress(("GET", "app"))
    return (directory / cells.file_name("w9")).read_bytes()


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_damage_never_breaks_a_scrape_nor_lowers_a_count(tmp_path_factory, data) -> None:
    tmp = tmp_path_factory.mktemp("cells")
    raw = bytearray(_valid_bytes(tmp))
    (tmp / cells.file_name("w9")).unlink()
    used = struct.unpack_from("=Q", raw, 16)[0]
    for _ in range(data.draw(st.integers(1, 6), label="flips")):
        pos = data.draw(st.integers(0, used + 16), label="pos")
        raw[pos] = data.draw(st.integers(0, 255), label="byte")
    (tmp / cells.file_name("w1")).write_bytes(bytes(raw))
    good = cells.CellsWriter(BOUNDS, str(tmp), "w0")
    observe(good.histogram(LABELS), 0.3)
    registry = CollectorRegistry()
    MultiProcessDirCollector(registry, str(tmp))
    generate_latest(registry)  # must neither raise nor hang
    generate_openmetrics(registry)


class RetryClock:
    """Stands in for the writer's retry clock: time moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _full(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_file_that_cannot_be_created_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    """A partial file would be read as damaged at every scrape (and fire the read-errors alert)."""
    monkeypatch.setattr(cells, "_reserve", _full)
    writer = cells.CellsWriter(BOUNDS, str(tmp_path), "w1")
    assert writer.failed and not writer.overflow_visible
    assert sorted(os.listdir(tmp_path)) == []
    collector = MultiProcessDirCollector(None, str(tmp_path))
    list(collector.collect())
    assert collector.read_errors == 0


def test_a_scrape_during_creation_sees_no_file_rather_than_a_torn_one(tmp_path: Path, monkeypatch) -> None:
    """The scrape runs while the first chunk is allocated and its header not written yet."""
    collector = MultiProcessDirCollector(None, str(tmp_path))
    during: list[tuple[int, int]] = []
    write_header = cells.CellsWriter._write_header

    def scrape_first(self: cells.CellsWriter, chunk: object) -> None:
        list(collector.collect())
        during.append((collector.read_errors, collector.cell_files_read))
        write_header(self, chunk)  # type: ignore[arg-type]

    monkeypatch.setattr(cells.CellsWriter, "_write_header", scrape_first)
    writer = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    observe(writer.histogram(LABELS), 0.3)
    assert during == [(0, 0)]
    assert not list(tmp_path.glob("*" + cells.TMP_SUFFIX))
    assert read(tmp_path) is not None


def test_a_full_disk_is_tried_again_after_the_retry_interval(tmp_path: Path, monkeypatch) -> None:
    clock = RetryClock()
    monkeypatch.setattr(cells, "_monotonic", clock)
    writer = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    observe(writer.histogram(LABELS), 0.3)
    attempts: list[int] = []

    def full(fd: int, offset: int, length: int) -> None:
        attempts.append(offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cells, "_reserve", full)
    new = [("GET", f"/r{i}", "200", "app") for i in range(400)]
    assert [writer.histogram(labels) for labels in new][-1] is writer.overflow
    tried = len(attempts)
    assert tried == 1  # once, not once per label set
    monkeypatch.setattr(cells, "_reserve", lambda fd, offset, length: os.posix_fallocate(fd, offset, length))
    clock.now += cells.RETRY_SECONDS / 2
    assert writer.histogram(new[-1]) is writer.overflow  # not yet: a full disk costs no call per request
    clock.now += cells.RETRY_SECONDS / 2
    row = writer.histogram(new[-1])
    assert row is not writer.overflow and not writer.failed
    observe(row, 0.05)
    snap = read(tmp_path)
    assert snap is not None and snap.histograms[new[-1]][1:] == [1.0, 0.0, 0.0, 0.0]


def test_a_file_that_could_not_be_created_is_created_on_a_later_try(tmp_path: Path, monkeypatch) -> None:
    clock = RetryClock()
    monkeypatch.setattr(cells, "_monotonic", clock)
    monkeypatch.setattr(cells, "_reserve", _full)
    writer = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    held = writer.overflow  # a caller's cached overflow row stays usable after the file appears
    assert writer.histogram(LABELS) is held
    monkeypatch.undo()
    monkeypatch.setattr(cells, "_monotonic", clock)
    clock.now += cells.RETRY_SECONDS
    row = writer.histogram(LABELS)
    assert row is not held and writer.overflow_visible and writer.generation == 1
    observe(row, 0.3)
    observe(held, 0.3)
    snap = read(tmp_path)
    assert snap is not None and snap.histograms[LABELS][1:] == [0.0, 1.0, 0.0, 0.0]
    writer.close()


def test_a_writer_given_the_masters_descriptor_continues_the_file_once_its_name_is_gone(tmp_path: Path):
    directory = tmp_path / "mp"
    directory.mkdir()
    held = cells.CellsWriter.hold(BOUNDS, str(directory), "w0")  # the master, before forking into w0
    snap = read(directory)
    assert snap is not None and snap.histograms == {}  # created complete, under its name
    cells.give(str(directory), "w0", os.dup(held))
    first = cells.CellsWriter(BOUNDS, str(directory), "w0")
    observe(first.histogram(LABELS), 0.3)
    shutil.rmtree(directory)
    cells.give(str(directory), "w0", os.dup(held))  # its replacement, forked after the rm -rf
    second = cells.CellsWriter(BOUNDS, str(directory), "w0")
    assert second.overflow_visible and not second.failed
    observe(second.histogram(LABELS), 0.05)
    snap = cells.read_fd(held, "w0")
    assert snap is not None and snap.histograms[LABELS][1:] == [1.0, 1.0, 0.0, 0.0]
    # Not given one (or given to another process): by the path, as before, which is gone
    cells._given[os.path.abspath(directory / cells.file_name("w0"))] = (-1, held)
    third = cells.CellsWriter(BOUNDS, str(directory), "w0")
    assert not third.overflow_visible and third.failed
    for writer in (first, second, third):
        writer.close()
    os.close(held)


def test_a_given_file_of_another_layout_is_left_alone_and_the_writer_goes_by_the_path(tmp_path: Path):
    held = cells.CellsWriter.hold(BOUNDS, str(tmp_path), "w0")
    cells.give(str(tmp_path), "w0", os.dup(held))
    first = cells.CellsWriter(BOUNDS, str(tmp_path), "w0")
    observe(first.histogram(LABELS), 0.3)
    first.close()
    cells.give(str(tmp_path), "w0", os.dup(held))
    other = cells.CellsWriter((1.0, 2.0), str(tmp_path), "w0")  # its own buckets: a file of its own
    other.histogram(LABELS)
    assert not other.failed and os.fstat(other.fd).st_ino != os.fstat(held).st_ino
    kept = cells.read_fd(held, "w0")
    assert kept is not None and kept.histograms[LABELS][1:] == [0.0, 1.0, 0.0, 0.0]
    other.close()
    os.close(held)
