"""The metrics side under faults and abuse: its processes killed, its port flooded, its credentials tried.

Real masters, real metrics peers, real HTTP over loopback, promtool on what is served and a real
Prometheus scraping through TLS, basic auth and a bearer token.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import gzip
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bcrypt
import httpx
import psutil
import pytest

from tests.support import client
from tests.support.faults import LEAN, TINY_APP, scrape
from tests.support.paths import VENV_BIN
from tests.support.prometheus import query
from tests.support.server import write_app
from tests.support.waiting import wait_until

KILLS = 6


def _peers(server) -> list[psutil.Process]:
    return sorted(server.metrics_peers(), key=lambda p: p.pid)


def _serving(peer: psutil.Process) -> bool:
    """Whether a peer has started serving: it then holds three pidfds (the master's, its own, its partner's),
    while one still starting up holds at most the two it inherited."""
    try:
        fds = os.listdir(f"/proc/{peer.pid}/fd")
        return sum(os.readlink(f"/proc/{peer.pid}/fd/{fd}") == "anon_inode:[pidfd]" for fd in fds) >= 3
    except OSError:
        return False


def _metrics_status(server) -> int | None:
    """Status of one GET /metrics on a bare socket (a client library's own set-up would blur the timing)."""
    try:
        answer = _raw(server, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n", timeout=2)
    except OSError:
        return None
    return int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else None


def test_metrics_peers_killed_repeatedly_under_load(start_server, app_dir, load, peaks, figures):
    """kill -9 of the metrics server's processes, in any order, under app load.

    Two metrics peers serve the port and replace each other; each kill -9 of either (the master's own
    child, a peer's child, a re-parented one, in turn) leaves /metrics answering at once and two peers
    again soon after, logged once per restart. No app request fails, every answered request is counted,
    the read-error counter never goes down, and a kill -9 of the master takes the metrics side with it.
    """
    write_app(app_dir, TINY_APP)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    wait_until(lambda: len(p := _peers(server)) == 2 and all(map(_serving, p)), 10, "two metrics peers")
    master = server.master()
    back_after: list[float] = []
    replaced_after: list[float] = []
    with peaks(server) as peak:
        run = load(server, clients=2)
        for kill in range(KILLS):
            # alternately the older peer (at first the master's own child) and the younger (a peer's child)
            peers = sorted(_peers(server), key=lambda p: p.create_time())
            victim = peers[0] if kill % 2 == 0 else peers[-1]
            survivors = {p.pid for p in peers} - {victim.pid}
            victim.kill()
            killed = time.monotonic()
            wait_until(lambda: _metrics_status(server) == 200, 2, "/metrics answering after the kill")
            back_after.append(time.monotonic() - killed)

            def replaced(victim=victim, survivors=survivors) -> bool:
                now = _peers(server)
                pids = {p.pid for p in now}
                return (
                    len(now) == 2 and victim.pid not in pids and survivors <= pids and all(map(_serving, now))
                )

            wait_until(replaced, 10, "a replacement peer", details=server.logs)
            replaced_after.append(time.monotonic() - killed)
            wait_until(lambda: _metrics_status(server) == 200, 2, "/metrics from both peers")
        run.stop()
    answered = 1 + run.answered  # the readiness probe too
    final = wait_until(
        lambda: (s := scrape(server)).total("tiny_hits_total") >= answered and s, 30, "every answer counted"
    )
    assert run.errors == 0 and set(run.statuses) == {200}, (run.errors, run.statuses)
    assert final.total("tiny_hits_total") == answered
    assert server.logs().count("starting a replacement") == KILLS, server.logs()
    assert peak.metrics_threads <= 6, peak.metrics_threads

    peers = _peers(server)
    master.kill()  # the whole metrics side leaves with the master
    gone = time.monotonic()
    wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in peers), 2, "peers gone")
    figures.record(
        sent=run.sent + 1,
        answered=answered,
        counted=int(final.total("tiny_hits_total")),
        errors=run.errors,
        faults=f"{KILLS} SIGKILL of a metrics peer, then SIGKILL of the master",
        metrics_back_max_s=round(max(back_after), 3),
        peer_replaced_max_s=round(max(replaced_after), 2),
        peers_gone_after_master_s=round(time.monotonic() - gone, 2),
        **peak.figures(),
    )


def test_healthcheck_fails_while_the_metrics_side_is_down(start_server, app_dir):
    """The image HEALTHCHECK under Gunicorn follows the metrics server, never the app port.

    Both peers stopped (SIGSTOP: they hold the port but answer nothing, and being alive they are not
    replaced): the app still answers, yet the healthcheck exits 1, since an orchestrator must notice
    metrics that cannot be scraped; it passes again once they go on.
    """
    write_app(app_dir)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    wait_until(lambda: len(_peers(server)) == 2, 10, "two metrics peers")
    assert _healthcheck(server) == 0
    group = _peer_group(server)
    os.killpg(group, signal.SIGSTOP)
    try:
        assert server.get("/").status_code == 200
        assert _healthcheck(server) == 1
    finally:
        os.killpg(group, signal.SIGCONT)
    assert _healthcheck(server) == 0


def _peer_group(server) -> int:
    """The peers' process group: theirs alone, not the master's."""
    groups = {os.getpgid(peer.pid) for peer in _peers(server)}
    assert len(groups) == 1 and os.getpgid(server.proc.pid) not in groups, groups
    return groups.pop()


def _two_new_peers_serving(server, old: set[int]) -> bool:
    peers = _peers(server)
    return len(peers) == 2 and not old & {p.pid for p in peers} and all(map(_serving, peers))


NONE_LEFT = "no metrics server peer is left"


def test_every_metrics_peer_killed_at_once_comes_back(start_server, app_dir, figures):
    """kill -9 of both metrics peers at once: the master starts a new pair, and the port answers again.

    One SIGKILL to the peers' process group reaches both in one kill(2), so neither runs again to see the
    other die, and nothing but the master can notice (the last peer's exit closes the last write end of a
    pipe whose read end the master watches). The app serves throughout, one line says what happened, no
    worker holds the metrics port, and a stop afterwards leaves no process behind. Before, the port stayed
    closed for good, without a word.
    """
    write_app(app_dir)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    wait_until(lambda: len(p := _peers(server)) == 2 and all(map(_serving, p)), 10, "two metrics peers")
    old = {p.pid for p in _peers(server)}
    os.killpg(_peer_group(server), signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: _metrics_status(server) == 200, 10, "/metrics answering again", details=server.logs)
    back_after = time.monotonic() - killed
    wait_until(lambda: _two_new_peers_serving(server, old), 10, "a new pair", details=server.logs)
    assert server.get("/").status_code == 200
    assert server.logs().count(NONE_LEFT) == 1, server.logs()
    holders = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)} | {server.proc.pid}
    listening = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == server.metrics_port
    }
    workers = {p.pid for p in server.workers()}
    assert listening and listening <= holders and not listening & workers, _listeners(server.metrics_port)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.logs()
    server.wait_all_gone()
    figures.record(faults="SIGKILL of both metrics peers at once", metrics_back_s=round(back_after, 2))


def test_survivor_killed_during_its_backoff_comes_back(start_server, app_dir):
    """The survivor killed while it waits to replace a partner that died young: the master starts a pair.

    One peer killed, then each replacement the survivor starts killed at once, until the survivor backs off
    (1 s, after three young deaths); then the survivor itself. No peer is left to start one (the random
    loop of the audit, one kill every 0.3 s, got there too), so only the master can bring the port back.
    """
    write_app(app_dir)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    wait_until(lambda: len(p := _peers(server)) == 2 and all(map(_serving, p)), 10, "two metrics peers")
    first, survivor = sorted(_peers(server), key=lambda p: p.create_time())
    first.kill()
    seen = {first.pid, survivor.pid}
    backing_off = "starting a replacement in "
    for kills in range(1, 5):
        young = wait_until(
            lambda: [p for p in _peers(server) if p.pid not in seen], 10, "a replacement", details=server.logs
        )[0]
        seen.add(young.pid)
        young.kill()
        # the survivor reaps it, then says when it starts the next one
        wait_until(lambda n=kills: server.logs().count(backing_off) >= n, 10, "the survivor's line")
        if backing_off + "1 s" in server.logs():
            break
    assert "starting a replacement in 1 s" in server.logs(), server.logs()
    assert [p.pid for p in _peers(server)] == [survivor.pid]  # within its back-off: the only peer left
    survivor.kill()
    wait_until(lambda: _metrics_status(server) == 200, 10, "/metrics answering again", details=server.logs)
    wait_until(lambda: _two_new_peers_serving(server, seen), 10, "a new pair", details=server.logs)
    assert server.logs().count(NONE_LEFT) == 1, server.logs()


def _listeners(port: int) -> str:
    """Who holds a listening socket on `port`: a failure's diagnosis."""
    found = []
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            try:
                process = psutil.Process(conn.pid)
                found.append(f"pid {conn.pid} ppid {process.ppid()} {process.status()} {process.cmdline()}")
            except (psutil.Error, TypeError):
                found.append(f"pid {conn.pid}")
    return "listening on the port: " + ("; ".join(found) or "nobody")


def _healthcheck(server) -> int:
    return subprocess.run(
        [str(VENV_BIN / "python"), "-m", "gunicorn_prometheus", "healthcheck"], env=server.env, timeout=30
    ).returncode


IDLE = 2000


def _raise_nofile(wanted: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


@pytest.mark.parametrize("nofile", [1024, None], ids=["ulimit-1024", "default-ulimit"])
def test_thousands_of_idle_and_slow_connections(start_server, app_dir, tmp_path, figures, nofile):
    """2,000 idle or half-sent connections on the metrics port.

    Half never send a byte, half send part of a request head. The metrics peers keep a bounded number of
    connections (closing the longest-waiting ones), so threads and memory stay flat; /healthz and a
    scrape still answer, also under a 1,024 open-files limit. The time each took is recorded.
    """
    write_app(app_dir)
    script = "start.sh"
    if nofile:
        wrapper = tmp_path / "start-limited.sh"
        wrapper.write_text(
            f"#!/bin/sh\nulimit -n {nofile}\nexec {Path(__file__).parents[2]}/image/start.sh\n"
        )
        wrapper.chmod(0o755)
        script = str(wrapper)
    server = start_server(app_dir, script=script, **LEAN)
    server.wait_metrics_ready()
    wait_until(lambda: len(_peers(server)) == 2, 10, "two metrics peers")
    before = {p.pid: p.memory_info().rss for p in _peers(server)}
    quiet = min(_timed(server, "/healthz") for _ in range(5))
    _raise_nofile(IDLE + 256)
    sockets: list[socket.socket] = []
    try:
        for i in range(IDLE):
            sock = socket.socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", server.metrics_port))
            if i % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            sockets.append(sock)
        peers = _peers(server)
        threads = max(p.num_threads() for p in peers)
        growth = max(p.memory_info().rss - before.get(p.pid, 0) for p in peers)

        def held_now() -> int:
            return sum(
                1
                for p in peers
                for c in p.net_connections()
                if c.laddr and c.laddr.port == server.metrics_port
            )

        # Each peer holds at most its cap (512, or the open-files limit less a reserve), plus the listener,
        # once it has caught up with the connections made above: a peer at its cap closes the longest-idle
        # connection for each new one, and an aborted connection's socket is closed on the loop's next
        # turn, so a read in the middle of an accept batch can find a few more (1030 seen once).
        cap = 2 * (512 + 1)
        held = wait_until(lambda: (n := held_now()) <= cap and n, 10, f"at most {cap} connections held")

        healthz = wait_until(lambda: _timed(server, "/healthz"), 10, "/healthz", ignore=(OSError,))
        metrics = wait_until(lambda: _timed(server, "/metrics"), 10, "/metrics", ignore=(OSError,))
    finally:
        for sock in sockets:
            sock.close()
    assert threads <= 6, threads
    assert growth < 64 * 2**20, growth
    figures.record(
        connections=IDLE,
        open_files_limit=nofile or "default",
        connections_held=held,
        metrics_threads_peak=threads,
        metrics_rss_growth_mb=round(growth / 2**20, 1),
        healthz_ms_without_them=round(quiet * 1000, 1),
        healthz_ms=round(healthz * 1000, 1),
        scrape_ms=round(metrics * 1000, 1),
    )


def _timed(server, path: str) -> float:
    """Seconds one GET on a new connection took (a bare socket: no client library's own set-up cost)."""
    started = time.monotonic()
    answer = _raw(server, f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return time.monotonic() - started


def test_request_limits_and_timeouts(start_server, app_dir):
    """Oversized request lines and heads get 414 and 431, anything but GET/HEAD 405, a silent
    connection is closed, and HEAD answers with headers only."""
    write_app(app_dir)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    assert _raw(server, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414")
    head = b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"b" * 17000 + b"\r\n\r\n"
    assert _raw(server, head).startswith(b"HTTP/1.1 431")
    many = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n"
    assert _raw(server, many).startswith(b"HTTP/1.1 431")
    assert _raw(server, b"POST /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert _raw(server, b"GET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 404")
    head_only = _raw(server, b"HEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert head_only.startswith(b"HTTP/1.1 200") and head_only.endswith(b"\r\n\r\n"), head_only[-200:]
    # HEAD_TIMEOUT (10 s): a connection that sends nothing is closed by the server
    with socket.create_connection(("127.0.0.1", server.metrics_port)) as sock:
        sock.settimeout(20)
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert 9 <= time.monotonic() - started < 15


MALFORMED = [
    (b"GET //[ HTTP/1.1\r\n", b"400"),  # urlsplit raised ValueError on it: a 500 and a traceback
    (b"GET //host/metrics HTTP/1.1\r\n", b"404"),  # a path, not an authority to skip
    (b"GET /metrics\x01 HTTP/1.1\r\n", b"400"),
    (b"G\x7fT /metrics HTTP/1.1\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\nAccept: text/plain\nX-Injected: 1\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\nX-Nul: a\x00b\r\n", b"400"),
    # prometheus_client compares the version as a tuple of ints and strs: TypeError, a 500 and a traceback
    (b"GET /metrics HTTP/1.1\r\nAccept: text/plain; version=foo\r\n", b"200"),
    (b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.x\r\n", b"200"),
    (b"GET /metrics?a[]=|{} HTTP/1.1\r\n", b"200"),  # a query is not parsed: lenient
]


def test_malformed_requests_get_an_answer_and_no_traceback(start_server, app_dir):
    """Whatever a client sends is checked where the head is parsed: 400 for a malformed target or a control
    character, the plain text format for an Accept header prometheus_client cannot compare; never a 500,
    and nothing in the logs for it (each such request used to log a 14-line traceback)."""
    write_app(app_dir)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    for head, status in MALFORMED:
        answer = _raw(server, head + b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), (head, answer[:300])
    assert server.metrics_get("/healthz").status_code == 200  # and the peers went on serving
    assert "Traceback" not in server.logs(), server.logs()


# An app whose /metrics is large (about 1.6 MB): 6,000 series with long label values.
WIDE_APP = """
    from prometheus_client import Counter

    WIDE = Counter("wide_series", "Many series, for a large /metrics body.", ["key"])
    for i in range(6000):
        WIDE.labels(f"{i:05d}-" + "x" * 240).inc()


    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
"""
PIPELINED = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def _non_reader(port: int) -> socket.socket:
    """A client with a 4 KiB receive buffer that will never read: its responses pile up at the server."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window is set then
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def test_clients_that_pipeline_and_never_read_cost_bounded_memory(start_server, app_dir, figures):
    """4 clients pipeline GET /metrics (1.6 MB each) 20 times a second and never read an answer.

    A peer takes the next request of a connection only once the last response has left its buffer (asyncio
    flow control), so each such connection costs one response at most: the peers' memory stays flat while
    the requests keep coming, and other clients' scrapes are answered meanwhile. Reading on and answering
    every pipelined request grew each peer by 4-5 MB a second, for as long as the client stayed.
    """
    write_app(app_dir, WIDE_APP)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    wait_until(lambda: len(_peers(server)) == 2, 10, "two metrics peers")
    body = len(server.metrics_get("/metrics").content)
    peers = _peers(server)
    # Both peers must have built and sent a large body before their memory is noted (the kernel hands a
    # connection to either: four scrapes once all went to one, and the other's first scrape, imports and
    # all, looked like 28 MB of growth): scrape until each has spent CPU time on one.
    cpu = {p.pid: sum(p.cpu_times()[:2]) for p in peers}

    def both_served() -> bool:
        assert server.metrics_get("/metrics").status_code == 200
        return all(sum(p.cpu_times()[:2]) - cpu[p.pid] > 0.05 for p in peers)

    wait_until(both_served, 30, "both peers to have served a large scrape")
    for _ in range(2):
        assert server.metrics_get("/metrics").status_code == 200
    before = {p.pid: p.memory_info().rss for p in peers}
    clients = [_non_reader(server.metrics_port) for _ in range(4)]
    growth: list[int] = []
    scrapes: list[float] = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            for sock in clients:
                with contextlib.suppress(BlockingIOError):
                    sock.send(PIPELINED)
            if len(growth) % 10 == 0:
                started = time.monotonic()
                assert server.metrics_get("/metrics").status_code == 200
                scrapes.append(time.monotonic() - started)
            growth.append(max(p.memory_info().rss - before[p.pid] for p in peers))
            time.sleep(0.05)  # the clients' pace: 20 requests a second each
    finally:
        for sock in clients:
            sock.close()
    half = len(growth) // 2
    late = max(growth[half:]) - max(growth[:half])
    assert max(growth) < 4 * body + 16 * 2**20, (max(growth), body)
    assert late < 4 * 2**20, (late, growth)
    figures.record(
        body_mb=round(body / 2**20, 2),
        non_reading_clients=len(clients),
        peer_rss_growth_max_mb=round(max(growth) / 2**20, 1),
        growth_second_half_mb=round(late / 2**20, 1),
        other_scrapes=len(scrapes),
        other_scrape_max_ms=round(max(scrapes) * 1000),
    )


def _raw(server, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` as is and read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_fifty_concurrent_scrapes_are_each_valid(start_server, app_dir, figures):
    """50 concurrent scrapes, in all formats: each one complete and valid under `promtool check metrics`."""
    write_app(app_dir, TINY_APP)
    server = start_server(app_dir, **LEAN)
    server.wait_metrics_ready()
    for _ in range(20):
        server.get("/")
    variants = [b"", b"Accept-Encoding: gzip\r\n", b"Accept: application/openmetrics-text; version=1.0.0\r\n"]

    def one(i: int) -> tuple[float, bytes, bytes]:
        # bare sockets: 50 clients of a library in threads here measure the client, not the server
        started = time.monotonic()
        answer = _raw(server, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n" + variants[i % 3] + b"\r\n")
        elapsed = time.monotonic() - started
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
        return elapsed, gzip.decompress(body) if b"Content-Encoding: gzip" in head else body, head

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    for _, body, head in results:
        text = body.decode()
        assert "tiny_hits_total" in text
        if b"openmetrics" in head:
            assert text.endswith("# EOF\n")
        else:
            result = subprocess.run(
                ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30
            )
            assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert sum(b"Content-Encoding: gzip" in r[2] for r in results) == 17  # negotiated per request
    figures.record(
        scrapes=50, slowest_ms=round(max(r[0] for r in results) * 1000), all_valid="yes (promtool)"
    )


# --- access control ----------------------------------------------------------------------------------


def _tls_files(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


PASSWORD = "s3cret-pass"


@pytest.fixture
def secured(start_server, app_dir, tmp_path):
    """A server whose metrics port needs TLS and basic auth or a bearer token."""
    write_app(app_dir)
    cert, key = _tls_files(tmp_path)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    config = tmp_path / "web.yml"
    config.write_text(
        textwrap.dedent(f"""
        tls_server_config:
          cert_file: {cert.name}
          key_file: {key.name}
        basic_auth_users:
          prometheus: {hashed}
        """)
    )
    token = tmp_path / "token"
    token.write_text("tok-123456\n")
    server = start_server(
        app_dir, METRICS_WEB_CONFIG=str(config), METRICS_BEARER_TOKEN_FILE=str(token), **LEAN
    )
    server.cert, server.token = cert, token  # type: ignore[attr-defined]
    wait_until(
        lambda: (
            client.get(f"https://127.0.0.1:{server.metrics_port}/healthz", verify=_ca(cert)).status_code
            == 200
        ),
        30,
        "https /healthz",
        ignore=(httpx.HTTPError,),
    )
    return server


def _ca(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def test_credentials_right_wrong_missing_over_tls(secured):
    """Right, wrong and missing credentials, over TLS only.

    Basic auth (bcrypt) and the bearer token each get 200; a wrong password, a wrong token, an unknown
    scheme or none at all get 401 with `WWW-Authenticate` and no metrics; /healthz answers without
    credentials but shows detail only with them; plain HTTP gets no answer.
    """
    url = f"https://127.0.0.1:{secured.metrics_port}"
    verify = _ca(secured.cert)

    def get(path: str, **headers: str) -> httpx.Response:
        return client.get(url + path, headers=headers, verify=verify, timeout=10)

    basic = "Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
    wrong = "Basic " + base64.b64encode(b"prometheus:nope").decode()
    assert get("/metrics", Authorization=basic).status_code == 200
    assert "gunicorn_workers_serving" in get("/metrics", Authorization=basic).text
    assert get("/metrics", Authorization="Bearer tok-123456").status_code == 200
    for headers in (
        {"Authorization": wrong},
        {"Authorization": "Bearer tok-x"},
        {"Authorization": "Digest x"},
        {},
    ):
        response = get("/metrics", **headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Basic realm=")
        assert b"gunicorn" not in response.content
        assert get("/nothing", **headers).status_code == 401
    assert get("/healthz").json() == {"status": "ok"}
    assert get("/healthz", Authorization=basic).json()["workers_serving"] >= 1
    with pytest.raises(httpx.HTTPError):
        client.get(f"http://127.0.0.1:{secured.metrics_port}/metrics", timeout=5).raise_for_status()
    assert _healthcheck(secured) == 0


def test_real_prometheus_scrapes_through_tls_basic_auth_and_bearer(secured, prometheus, figures):
    """A real Prometheus scrapes the secured port: TLS with basic auth, TLS with a bearer token file;
    a job with a wrong password is down with a 401."""
    target = f"127.0.0.1:{secured.metrics_port}"
    tls = f"tls_config:\n  ca_file: {secured.cert}\n"
    with_basic = prometheus(
        target, job=f"scheme: https\n{tls}basic_auth:\n  username: prometheus\n  password: {PASSWORD}\n"
    )
    with_token = prometheus(
        target, job=f"scheme: https\n{tls}authorization:\n  credentials_file: {secured.token}\n"
    )
    with_wrong = prometheus(
        target, job=f"scheme: https\n{tls}basic_auth:\n  username: prometheus\n  password: wrong\n"
    )
    for base in (with_basic, with_token):
        wait_until(lambda base=base: query(base, 'up{job="app"} == 1'), 60, f"{base}: target up")
        wait_until(lambda base=base: query(base, "gunicorn_workers_serving"), 30, f"{base}: series scraped")

    def down_with_401() -> bool:
        try:
            targets = client.get(f"{with_wrong}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        except (httpx.HTTPError, KeyError, ValueError):
            return False
        return any(t["health"] == "down" and "401" in t.get("lastError", "") for t in targets)

    wait_until(down_with_401, 60, "the wrong-password job down with 401")
    figures.record(jobs="TLS + basic auth, TLS + bearer token file: up; wrong password: down (401)")


@pytest.mark.parametrize(
    ("variable", "content", "expected"),
    [
        (
            "METRICS_WEB_CONFIG",
            "basic_auth_users:\n  alice: plain-text\n",
            "basic_auth_users.alice is not a bcrypt",
        ),
        (
            "METRICS_WEB_CONFIG",
            "tls_server_config:\n  cert_file: missing.crt\n",
            "needs both cert_file and key_file",
        ),
        ("METRICS_WEB_CONFIG", "rate_limit:\n  burst: 2\n", "rate_limit is not supported"),
        ("METRICS_WEB_CONFIG", "tls_server_config: [\n", "not valid YAML"),
        ("METRICS_BEARER_TOKEN_FILE", "\n", "the file is empty"),
    ],
)
def test_bad_access_files_fail_the_start_in_one_line(
    start_server, app_dir, tmp_path, variable, content, expected
):
    """A bad web config or token file: one line naming the variable, non-zero exit, no traceback."""
    write_app(app_dir)
    path = tmp_path / "access-file"
    path.write_text(content)
    server = start_server(app_dir, wait=None, **{variable: str(path)})
    logs = server.failed_start_logs()
    line = next(line for line in logs.splitlines() if variable in line)
    assert expected in line and "configuration error" in line, logs


# A metrics HTTP server on its own, in a child process that prints its port: {setup} runs first,
# {response} is the body of every answer, {options} go to HttpServer.
_LONE_SERVER = """
import asyncio, resource, socket, sys
from gunicorn_prometheus.metrics_http import HttpServer, Response

{setup}


async def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    print(listener.getsockname()[1], flush=True)

    async def handler(request):
        return Response(200, {response})

    HttpServer(listener, handler, {options}).start()
    await asyncio.Event().wait()


asyncio.run(main())
"""

_TINY_SERVER = _LONE_SERVER.format(
    setup="resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))",
    response='b"ok\\n"',
    options="max_connections=10_000",  # a cap above the limit: EMFILE happens
)


def test_out_of_file_descriptors_closes_the_longest_waiting(figures):
    """Out of file descriptors (EMFILE) with a connection cap set too high for the limit.

    The metrics HTTP server under `ulimit -n 64` gets 300 idle connections: each accept that fails for
    lack of descriptors closes the connection that has waited longest, so a new request is still
    answered, and the server does not spin (its CPU stays near idle).
    """
    child = subprocess.Popen([sys.executable, "-c", _TINY_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        proc = psutil.Process(child.pid)
        sockets = []
        try:
            for _ in range(300):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sockets.append(sock)
            cpu_before = sum(proc.cpu_times()[:2])
            started = time.monotonic()

            def answered() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                    return sock.recv(100)

            first = wait_until(answered, 10, "an answer while out of descriptors", ignore=(OSError,))
            elapsed = time.monotonic() - started
            time.sleep(1)  # measuring idleness needs a window of time: CPU spent in it must stay small
            cpu = sum(proc.cpu_times()[:2]) - cpu_before
            open_fds = proc.num_fds()
        finally:
            for sock in sockets:
                sock.close()
    finally:
        child.kill()
        child.wait()
    assert first.startswith(b"HTTP/1.1 200"), first
    assert open_fds <= 64
    assert cpu < 0.5, cpu
    figures.record(
        connections=300,
        open_files_limit=64,
        answer_ms=round(elapsed * 1000, 1),
        server_cpu_s_in_idle_window=round(cpu, 3),
    )


_BIG_SERVER = _LONE_SERVER.format(
    setup="",
    response='b"x" * 8_000_000',  # twice the most a kernel send buffer takes
    options="send_timeout=float(sys.argv[1])",
)


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_a_client_that_never_reads_is_closed_after_the_send_timeout(connection):
    """A client that reads nothing of an 8 MB response is disconnected once SEND_TIMEOUT (1 s here) passes
    without progress, whether the connection was to be kept alive or closed after the response (a
    closing transport otherwise waits for the client for ever, holding the response)."""
    child = subprocess.Popen([sys.executable, "-c", _BIG_SERVER, "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        proc = psutil.Process(child.pid)
        sock = _non_reader(port)
        sock.setblocking(True)
        sent = time.monotonic()
        sock.sendall(f"GET / HTTP/1.1\r\nConnection: {connection}\r\n\r\n".encode())

        def held() -> int:
            return sum(c.status == psutil.CONN_ESTABLISHED for c in proc.net_connections("tcp"))

        wait_until(lambda: held() == 1, 5, "the server to hold the connection")
        wait_until(lambda: held() == 0, 5, "the server to close the connection")
        closed_after = time.monotonic() - sent
        sock.close()
    finally:
        child.kill()
        child.wait()
    assert closed_after >= 1, closed_after
