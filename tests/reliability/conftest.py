"""What the fault tests share: real servers under load, injected faults, exact counts, and figures.

Every test here starts a real master with real workers on loopback ports of its own, drives it with
`load` (client threads with a request budget and a deadline, so no loop runs unbounded), injects a fault
(a SIGKILL, a full or removed directory, a flood of junk), and then compares what the clients saw
answered with what the metrics port counted. Each test records its figures with `figures.record(...)`;
`scripts/reliability-report` runs this directory and renders them into docs/reliability.md.

The server-starting fixtures (start_server, app_dir) are tests/conftest.py's, shared by every test
directory; the helpers behind them live in tests/support.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import Server, write_app  # noqa: F401 (test modules import them from here)
from tests.support.waiting import wait_until  # noqa: F401

#: Where the figures go: set by scripts/reliability-report; unset in a normal test run (nothing written).
RESULTS_ENV = "RELIABILITY_RESULTS"

#: A bare ASGI app that counts its own requests with prometheus_client *before* answering: every
#: answered request is in `tiny_hits_total` whatever happens to the worker afterwards, which makes it
#: the reference count the HTTP metrics are compared with. `/slow?ms=N` holds a request N ms, and
#: `/hang` never answers (for worker timeouts).
TINY_APP = """
    import time
    from urllib.parse import parse_qs

    from prometheus_client import Counter

    HITS = Counter("tiny_hits", "Requests the app itself counted.")


    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/hang":
            time.sleep(3600)  # blocks the event loop: the worker stops notifying the master
        if scope["path"] == "/slow":
            ms = int(parse_qs(scope["query_string"].decode()).get("ms", ["0"])[0])
            time.sleep(ms / 1000)
        HITS.inc()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
"""

#: Settings that make a test server lean: two workers, no access log, quiet.
LEAN = {"WEB_CONCURRENCY": "2", "LOG_LEVEL": "warning", "ACCESS_LOG": ""}


# --- reading the metrics port ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """One parsed scrape: every sample, and sums over label subsets."""

    text: str
    samples: tuple[tuple[str, dict[str, str], float], ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        found = []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                found.append((s.name, dict(s.labels), s.value))
        return cls(text, tuple(found))

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def values(self, name: str, label: str) -> dict[str, float]:
        """`name`'s samples keyed by one label's value."""
        return {lab.get(label, ""): value for sample, lab, value in self.samples if sample == name}

    def series(self, prefix: str = "") -> int:
        """How many samples (series) the scrape holds, optionally only those starting with `prefix`."""
        return sum(1 for sample, _, _ in self.samples if sample.startswith(prefix))


def scrape(server: Any) -> Scrape:
    response = server.metrics_get()
    assert response.status_code == 200, response.text
    return Scrape.parse(response.text)


# --- load ------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """Client threads sending requests until a request budget, a stop() or a deadline: never unbounded.

    `answered` counts responses received (by status), `errors` requests that got no response (refused,
    reset, timed out): the server may or may not have counted those.
    """

    url: str
    clients: int = 4
    budget: int | None = None
    deadline: float = 60.0
    request: Callable[[random.Random], tuple[str, str]] = lambda rng: ("GET", "/")
    timeout: float = 10.0
    statuses: Counter = field(default_factory=Counter)
    errors: int = 0
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or (self.budget is not None and self.sent >= self.budget):
                return False
            self.sent += 1
            return True

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        end = time.monotonic() + self.deadline
        with httpx.Client(timeout=self.timeout, headers={"Connection": "close"}) as http:
            while time.monotonic() < end and self._take():
                method, path = self.request(rng)
                try:
                    status = http.request(method, self.url + path).status_code
                except httpx.HTTPError:
                    with self._lock:
                        self.errors += 1
                    continue
                with self._lock:
                    self.statuses[status] += 1

    def start(self) -> Load:
        self._threads = [
            threading.Thread(target=self._client, args=(seed,), daemon=True) for seed in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> Load:
        self._stop.set()
        return self.join()

    def join(self, timeout: float | None = None) -> Load:
        limit = self.deadline + self.timeout + 5 if timeout is None else timeout
        for thread in self._threads:
            thread.join(limit)
        assert not self.running(), "load clients did not finish"
        return self


@pytest.fixture
def load() -> Iterator[Callable[..., Load]]:
    """`load(server, clients=4, budget=N, request=fn)` starts client threads; all stopped at teardown."""
    started: list[Load] = []

    def make(server: Any, **kwargs: Any) -> Load:
        started.append(run := Load(server.url, **kwargs).start())
        return run

    yield make
    for run in started:
        run.stop()


# --- faults ---------------------------------------------------------------------------------------------


def kill_worker(server: Any, rng: random.Random, sig: int = signal.SIGKILL) -> int | None:
    """Send `sig` to one live worker, chosen by `rng`; its pid, or None if none was alive."""
    workers = server.workers()
    if not workers:
        return None
    victim = rng.choice(sorted(workers, key=lambda p: p.pid))
    with contextlib.suppress(psutil.Error):
        victim.send_signal(sig)
        return victim.pid
    return None


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """`small_tmpfs(size_bytes)` mounts a tmpfs of that size (root only) and unmounts it at teardown."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        target = tmp_path / f"tmpfs-{len(mounted)}"
        target.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill(directory: Path, leave: int = 0) -> int:
    """Fill the filesystem of `directory` with a ballast file until `leave` bytes remain; bytes written."""
    ballast = directory / "ballast"
    written = 0
    chunk = b"\0" * 4096
    with ballast.open("ab") as out:
        while os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize > leave:
            try:
                out.write(chunk)
                out.flush()
            except OSError:
                break
            written += len(chunk)
    return written


# --- peaks ----------------------------------------------------------------------------------------------


@dataclass
class Peaks:
    """Highest threads, resident memory and metrics-directory size of a server's processes, sampled."""

    server: Any
    directory: Path
    interval: float = 0.1
    threads: int = 0
    metrics_threads: int = 0
    rss_bytes: int = 0
    metrics_rss_bytes: int = 0
    dir_bytes: int = 0
    dir_files: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        threads = rss = 0
        with contextlib.suppress(psutil.Error):
            master = psutil.Process(self.server.proc.pid)
            for proc in [master, *master.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t, r = proc.num_threads(), proc.memory_info().rss
                    threads, rss = threads + t, rss + r
                    if "metrics_server" in " ".join(proc.cmdline()):
                        self.metrics_threads = max(self.metrics_threads, t)
                        self.metrics_rss_bytes = max(self.metrics_rss_bytes, r)
        self.threads, self.rss_bytes = max(self.threads, threads), max(self.rss_bytes, rss)
        size = files = 0
        with contextlib.suppress(OSError):
            for root, _, names in os.walk(self.directory):
                for name in names:
                    with contextlib.suppress(OSError):
                        size += os.stat(os.path.join(root, name)).st_blocks * 512
                        files += 1
        self.dir_bytes, self.dir_files = max(self.dir_bytes, size), max(self.dir_files, files)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Peaks:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()

    def figures(self) -> dict[str, int]:
        return {
            "threads_peak": self.threads,
            "metrics_threads_peak": self.metrics_threads,
            "rss_peak_mb": round(self.rss_bytes / 2**20),
            "metrics_rss_peak_mb": round(self.metrics_rss_bytes / 2**20),
            "dir_peak_kb": round(self.dir_bytes / 1024),
            "dir_files_peak": self.dir_files,
        }


@pytest.fixture
def peaks() -> Callable[[Any], Peaks]:
    """`with peaks(server) as p:` samples the server's process tree and metrics directory meanwhile."""

    def make(server: Any) -> Peaks:
        return Peaks(server, Path(server.env["PROMETHEUS_MULTIPROC_DIR"]))

    return make


# --- figures --------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What one scenario measured; written (one JSON line) to $RELIABILITY_RESULTS at teardown."""

    test: str
    scenario: str
    about: str
    values: dict[str, Any] = field(default_factory=dict)

    def record(self, **values: Any) -> None:
        self.values.update(values)


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    if call.when == "call":
        item.reliability_outcome = "passed" if call.excinfo is None else "failed"  # type: ignore[attr-defined]
        item.reliability_seconds = round(call.duration, 1)  # type: ignore[attr-defined]


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """The current scenario's figures; its name and description come from the test's docstring."""
    doc = (request.function.__doc__ or request.node.name).strip()
    first, _, rest = doc.partition("\n")
    result = Figures(request.node.nodeid, first.strip().rstrip("."), " ".join(rest.split()))
    yield result
    target = os.environ.get(RESULTS_ENV)
    if not target:
        return
    line = {
        "test": result.test,
        "scenario": result.scenario,
        "about": result.about,
        "outcome": getattr(request.node, "reliability_outcome", "error"),
        "seconds": getattr(request.node, "reliability_seconds", None),
        **result.values,
    }
    with open(target, "a") as out:
        out.write(json.dumps(line) + "\n")
