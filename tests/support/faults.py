"""The fault tests' framework (tests/reliability): real servers under load, injected faults, exact counts,
peaks of threads/memory/files, and the figures each scenario records for docs/reliability.md.

The fixtures that use these (load, small_tmpfs, peaks, figures) are in tests/reliability/conftest.py.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from gunicorn_prometheus.metrics_process import PROCESS_NAME as METRICS_PROCESS_NAME
from tests.support.metrics_text import samples
from tests.support.server import scrape as scrape_text
from tests.support.waiting import wait_until

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


@dataclass(frozen=True)
class Scrape:
    """One parsed scrape: every sample, and sums over label subsets."""

    text: str
    samples: tuple[tuple[str, dict[str, str], float], ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        return cls(
            text, tuple((name, dict(labels), value) for (name, labels), value in samples(text).items())
        )

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
    return Scrape.parse(scrape_text(server))


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
    #: A new connection per request (the default: a killed worker then costs one request per client);
    #: False keeps connections alive, for volume.
    close: bool = True
    #: Optional: what to tally each answered request under (e.g. the label set it should be counted in).
    classify: Callable[[str, str, int], Any] | None = None
    statuses: Counter = field(default_factory=Counter)
    classes: Counter = field(default_factory=Counter)
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
        send = self._keepalive_sender() if not self.close else self._closing_sender()
        try:
            while time.monotonic() < end and self._take():
                method, path = self.request(rng)
                status = send(method, path)
                with self._lock:
                    if status is None:
                        self.errors += 1
                        continue
                    self.statuses[status] += 1
                    if self.classify is not None:
                        self.classes[self.classify(method, path, status)] += 1
        finally:
            send(None, None)  # closes the connection

    def _closing_sender(self) -> Callable[[str | None, str | None], int | None]:
        client = httpx.Client(timeout=self.timeout, headers={"Connection": "close"})

        def send(method: str | None, path: str | None) -> int | None:
            if method is None or path is None:
                client.close()
                return None
            try:
                return client.request(method, self.url + path).status_code
            except httpx.HTTPError:
                return None

        return send

    def _keepalive_sender(self) -> Callable[[str | None, str | None], int | None]:
        """The standard library's client on one kept-alive connection: a few times cheaper per request
        than httpx, which matters when the load is 20,000 requests on two shared cores."""
        host, port = httpx.URL(self.url).host, httpx.URL(self.url).port
        conn: list[http.client.HTTPConnection] = []

        def send(method: str | None, path: str | None) -> int | None:
            if method is None or path is None:
                if conn:
                    conn.pop().close()
                return None
            if not conn:
                conn.append(http.client.HTTPConnection(host, port, timeout=self.timeout))
            try:
                conn[0].request(method, path)
                response = conn[0].getresponse()
                response.read()
                if response.will_close:
                    conn.pop().close()
                return response.status
            except (OSError, http.client.HTTPException):
                conn.pop().close()
                return None

        return send

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


def wait_replacement_serving(server: Any, boots: int, workers: int = 2, timeout: float = 30.0) -> None:
    """Wait until the master has booted its `boots`-th worker and `workers` serve.

    `/healthz` alone is not enough after a kill: until the master reaps the dead worker, its slot still
    counts as serving, so "2 serving" can hold before anything was replaced (and before the crash is
    counted). A boot is counted when the replacement forks, after the reap.
    """

    def replaced() -> bool:
        if scrape(server).total("gunicorn_worker_boots_total") < boots:
            return False
        return server.metrics_get("/healthz").json()["workers_serving"] == workers

    wait_until(replaced, timeout, f"worker boot {boots} serving")


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


class Poller:
    """Runs `poll()` on a thread every `interval` seconds while a `with` block runs, and once at each end."""

    interval: float
    join_timeout: float = 5.0
    _stop: threading.Event
    _thread: threading.Thread | None

    def poll(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self: P) -> P:
        self.poll()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.join_timeout)
        self.poll()


P = TypeVar("P", bound=Poller)


@dataclass
class Peaks(Poller):
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

    def poll(self) -> None:
        self.sample()

    def sample(self) -> None:
        threads = rss = 0
        with contextlib.suppress(psutil.Error):
            master = psutil.Process(self.server.proc.pid)
            # the metrics peers may have been re-parented away from the master: found by session
            tree = {
                p.pid: p for p in [master, *master.children(recursive=True), *self.server.metrics_peers()]
            }
            for proc in tree.values():
                with contextlib.suppress(psutil.Error):
                    t, r = proc.num_threads(), proc.memory_info().rss
                    threads, rss = threads + t, rss + r
                    if proc.cmdline()[:1] == [METRICS_PROCESS_NAME]:
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

    def figures(self) -> dict[str, int]:
        return {
            "threads_peak": self.threads,
            "metrics_threads_peak": self.metrics_threads,
            "rss_peak_mb": round(self.rss_bytes / 2**20),
            "metrics_rss_peak_mb": round(self.metrics_rss_bytes / 2**20),
            "dir_peak_kb": round(self.dir_bytes / 1024),
            "dir_files_peak": self.dir_files,
        }


@dataclass
class Figures:
    """What one scenario measured; written (one JSON line) to $RELIABILITY_RESULTS at teardown."""

    test: str
    scenario: str
    about: str
    values: dict[str, Any] = field(default_factory=dict)

    def record(self, **values: Any) -> None:
        self.values.update(values)


# --- counters that must never go down ---------------------------------------------------------------------


@dataclass
class CounterWatch(Poller):
    """Scrapes over and over in a thread and notes every counter sample that went down (a `_total`).

    Used as `with CounterWatch(server) as watch: ...` around a fault; then `watch.drops` must be empty.
    Series that vanish are not drops; a series coming back lower is.
    """

    server: Any
    interval: float = 0.02
    join_timeout: float = 15.0
    scrapes: int = 0
    drops: list[tuple[str, float, float]] = field(default_factory=list)
    _last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    _turn: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def poll(self) -> None:
        self.check()

    def check(self) -> None:
        """One scrape, compared with the one before; callers in any thread take turns, so every scrape
        is sent after the previous one was answered, as a Prometheus server's are."""
        with self._turn:
            self._check()

    def _check(self) -> None:
        try:
            response = self.server.metrics_get()
        except httpx.HTTPError:
            return
        if response.status_code != 200:
            return
        self.scrapes += 1
        for name, labels, value in Scrape.parse(response.text).samples:
            if not name.endswith("_total"):
                continue
            key = (name, tuple(sorted(labels.items())))
            before = self._last.get(key)
            if before is not None and value < before:
                self.drops.append((f"{name}{labels}", before, value))
            self._last[key] = value
