"""Metric file faults cost counts, never the process: full tmpfs (SIGBUS), removed directory, corrupt file.

Each case runs in a fresh interpreter (prometheus_client picks its multiprocess mode at import) against a
real directory: a real tmpfs of 256 KiB for the full-storage cases (this machine runs tests as root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gunicorn_prometheus import metric_files, shared_state

# Creates the metrics an app would (a counter with many label sets, a histogram, a livesum gauge) and
# uses them; prints the value read back and the write errors the table counted for this process.
SCRIPT = """
    import os, sys
    from pathlib import Path
    from gunicorn_prometheus import shared_state, slots

    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    guarded = sys.argv[1] == "guarded"
    table = shared_state.open_table(directory)
    shared_state.count_write_errors_as(table, 0)
    if guarded:
        slots.install_identity()
        slots.set_identity("w0")
    from prometheus_client import Counter, Gauge, Histogram

    fill = os.environ.get("FILL")
    if fill:  # leave the filesystem with no free page at all
        with open(fill, "wb", buffering=0) as ballast:
            try:
                while True:
                    ballast.write(b"\\0" * 4096)
            except OSError:
                pass
    hits = Counter("hits", "Hits.", ["path"])
    size = Histogram("size", "Sizes.")
    busy = Gauge("busy", "Busy.", multiprocess_mode="livesum")
    for i in range(int(os.environ.get("LABELS", "300"))):
        hits.labels(f"/route/{i}/" + "x" * 40).inc()
        size.observe(i)
        busy.inc()
    print(hits.labels("/route/0/" + "x" * 40)._value.get(), table.worker(0).write_errors if table else -1)
"""


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "tmpfs"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(target)], check=False)
    assert mounted.returncode == 0, "mounting a tmpfs needs root"
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def run(directory: Path, mode: str, **env: str) -> subprocess.CompletedProcess:
    (directory / shared_state.STATE_DIR).mkdir(exist_ok=True)
    if not shared_state.table_path(directory).exists():
        shared_state.create(directory)
        shared_state.forget(directory)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), mode],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_full_tmpfs_kills_prometheus_clients_own_values_with_sigbus(tiny_tmpfs: Path) -> None:
    """The fault is real: without the guard, the first write into an unbacked page is SIGBUS."""
    result = run(tiny_tmpfs, "plain", FILL=str(tiny_tmpfs / "ballast"))
    assert result.returncode == -signal.SIGBUS, (result.returncode, result.stderr[-2000:])


def test_a_full_tmpfs_costs_counts_not_the_process(tiny_tmpfs: Path) -> None:
    result = run(tiny_tmpfs, "guarded", FILL=str(tiny_tmpfs / "ballast"))
    assert result.returncode == 0, result.stderr[-2000:]
    value, errors = result.stdout.split()
    assert float(value) == 1.0  # the value lives on in memory
    assert int(errors) >= 1
    # logged once per file, with the path and what to do, never a traceback
    assert "Traceback" not in result.stderr
    assert result.stderr.count("cannot write metrics to") == len(set(result.stderr.splitlines()))
    assert "--shm-size" in result.stderr and str(tiny_tmpfs) in result.stderr


def test_growing_files_are_allocated_not_sparse(tmp_path: Path) -> None:
    """Files grow past their first 64 KiB (many label sets) and every page is allocated."""
    result = run(tmp_path, "guarded", LABELS="1500")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1.0", "0"]
    files = sorted(tmp_path.glob("*.db"))
    assert any(f.stat().st_size > 1 << 16 for f in files), [f.stat().st_size for f in files]
    for f in files:
        assert f.stat().st_blocks * 512 >= f.stat().st_size, f


def test_a_corrupt_predecessor_file_costs_counts_not_the_process(tmp_path: Path) -> None:
    """A successor in slot w0 finds a damaged counter file: its counter lives in memory, counted."""
    bad = tmp_path / "counter_w0.db"
    # "used" says 64 bytes, the first entry claims 1,000: prometheus_client's reader raises on it
    header = (64).to_bytes(4, "little") + bytes(4) + (1000).to_bytes(4, "little")
    bad.write_bytes(header + bytes((1 << 16) - len(header)))
    result = run(tmp_path, "guarded")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "1.0" and int(result.stdout.split()[1]) >= 1
    assert "Traceback" not in result.stderr


def test_a_removed_directory_costs_counts_not_the_process(tmp_path: Path) -> None:
    directory = tmp_path / "gone"
    directory.mkdir()
    run(directory, "guarded")  # creates the table; now the directory goes away under the next process
    removal = "import shutil; shutil.rmtree(directory)\nfrom prometheus_client import"
    script = textwrap.dedent(SCRIPT).replace("from prometheus_client import", removal)
    result = subprocess.run(
        [sys.executable, "-c", script, "guarded"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1.0", "1"] or int(result.stdout.split()[1]) >= 1, result.stdout
    assert "Traceback" not in result.stderr


def test_entry_size_matches_prometheus_clients_layout(tmp_path: Path) -> None:
    from prometheus_client.mmap_dict import MmapedDict

    path = tmp_path / "probe.db"
    d = MmapedDict(str(path))
    for key in ("a", "ab" * 7, "é" * 13):
        before = d._used
        d.write_value(key, 1.0, 0.0)
        assert d._used - before == metric_files._entry_size(key)
    d.close()


def test_a_file_that_cannot_be_allocated_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    """An empty file left on a full disk is unreadable to prometheus_client's reader: a read error at
    every scrape (and the read-errors alert) for a fault already counted as a write error."""

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError):
        metric_files.allocate_for(str(tmp_path / "counter_w2.db"), None)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    metric_files.allocate_for(str(tmp_path / "counter_w2.db"), None)
    assert os.listdir(tmp_path) == ["counter_w2.db"]
    from prometheus_client.mmap_dict import MmapedDict

    assert list(MmapedDict.read_all_values_from_file(str(tmp_path / "counter_w2.db"))) == []
