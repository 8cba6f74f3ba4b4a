"""The metrics port end to end: real master, real workers, real HTTP, promtool on every scrape."""

from __future__ import annotations

import gzip
import os
import re
import signal
import socket
import subprocess
import textwrap

import httpx
import pytest

from tests.support import client
from tests.support.apps import APP_WITH_OWN_METRICS
from tests.support.metrics_text import http_total, promtool_check, samples, value
from tests.support.paths import VENV_BIN
from tests.support.requests_many import send_all
from tests.support.server import scrape, scrape_until, write_app
from tests.support.waiting import wait_until


@pytest.fixture
def server(start_server, app_dir):
    write_app(app_dir, APP_WITH_OWN_METRICS)
    srv = start_server(app_dir, WEB_CONCURRENCY="2")
    wait_until(lambda: srv.metrics_get("/healthz").json()["workers_serving"] == 2, 30, "both workers serving")
    return srv


def spread_requests(server, method: str, path: str, count: int) -> None:
    """New connection per request, so the kernel spreads them over both workers."""
    for _ in range(count):
        response = client.request(method, server.url + path, timeout=10)
        assert response.status_code < 500 or path == "/boom"


def test_metrics_on_their_own_port_never_on_the_app_port(server):
    spread_requests(server, "GET", "/items/5?q=x", 7)
    text = scrape_until(server, lambda t: http_total(t, "/items/{item_id}", "200") == 7, "7 requests counted")
    promtool_check(text)
    assert (
        value(
            text,
            "starlette_request_duration_seconds_count",
            app_name="starlette",
            method="GET",
            path="/items/{item_id}",
            status_code="200",
        )
        == 7
    )
    assert server.get("/metrics").status_code == 404
    assert server.metrics_get("/other").status_code == 404


def test_app_metrics_aggregated_across_workers(server):
    for i in range(20):
        response = client.post(f"{server.url}/orders/{'book' if i % 2 else 'pen'}?items={i % 12}", timeout=10)
        assert response.status_code == 200
    pids = {w.pid for w in server.workers()}
    assert len(pids) == 2
    text = scrape_until(
        server,
        lambda t: http_total(t, "/orders/{kind}", "200", method="POST") == 20,
        "20 orders",
    )
    promtool_check(text)
    assert value(text, "shop_orders_total", kind="book") == 10
    assert value(text, "shop_orders_total", kind="pen") == 10
    assert value(text, "shop_basket_items_count") == 20
    assert value(text, "shop_basket_items_bucket", le="1.0") == sum(1 for i in range(20) if i % 12 <= 1)
    assert value(text, "shop_open_carts") == 20
    # both workers took part: each slot's livesum gauge file exists
    files = os.listdir(server.env["PROMETHEUS_MULTIPROC_DIR"])
    assert {"gauge_livesum_w0.db", "gauge_livesum_w1.db"} <= set(files), files


def test_openmetrics_and_gzip_negotiation(server):
    server.get("/")
    om = server.metrics_get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-encoding: gzip" in head.lower()
    text = gzip.decompress(body).decode()
    assert "gunicorn_workers_desired" in text
    promtool_check(text)


def test_healthz(server):
    response = server.metrics_get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["master_alive"] is True
    assert (body["workers_desired"], body["workers_alive"], body["workers_serving"]) == (2, 2, 2)


def test_server_metrics_and_process_stats(server):
    text = scrape(server)
    promtool_check(text)
    assert value(text, "gunicorn_workers_desired") == 2
    assert value(text, "gunicorn_workers_alive") == 2
    assert value(text, "gunicorn_worker_boots_total") == 2
    for process in ("master", "w0", "w1", "metrics"):
        assert value(text, "gunicorn_process_resident_memory_bytes", process=process) > 1_000_000, process
        assert value(text, "gunicorn_process_open_fds", process=process) > 0
        assert value(text, "gunicorn_process_threads", process=process) >= 1
        assert ("gunicorn_process_cpu_seconds_total", (("process", process),)) in samples(text)
    assert value(text, "gunicorn_workers_resident_memory_bytes") > 2_000_000
    # no pid ever appears as a label value
    assert not re.search(r'process="\d+"', text)


def test_worker_killed_is_counted_and_replaced_in_its_slot(server):
    before = scrape(server)
    victim = server.workers()[0]
    victim_cpu = value(before, "gunicorn_workers_cpu_seconds_total")
    victim.kill()
    wait_until(lambda: value(scrape(server), "gunicorn_worker_boots_total") == 3, 30, "a replacement worker")
    server.wait_metrics_ready()
    after = scrape(server)
    promtool_check(after)
    assert value(after, "gunicorn_worker_exits_total", reason="crash") == 1
    assert value(after, "gunicorn_worker_exits_total", reason="clean") == 0
    assert value(after, "gunicorn_workers_cpu_seconds_total") >= victim_cpu
    # still exactly two slots: the replacement took the dead worker's
    slots = {
        dict(labels)["process"]
        for (name, labels) in samples(after)
        if name == "gunicorn_process_resident_memory_bytes"
    } - {"master", "metrics"}
    assert slots == {"w0", "w1"}


def test_worker_timeout_is_counted(start_server, app_dir):
    write_app(app_dir, APP_WITH_OWN_METRICS)
    server = start_server(app_dir, WEB_CONCURRENCY="1", TIMEOUT="2")
    server.wait_metrics_ready()
    with pytest.raises(httpx.HTTPError):
        client.get(server.url + "/block?seconds=8", timeout=15)
    wait_until(
        lambda: value(scrape(server), "gunicorn_worker_exits_total", reason="timeout") == 1,
        30,
        "the timeout abort to be counted",
    )


def test_max_requests_recycle_is_counted(start_server, app_dir):
    write_app(app_dir, APP_WITH_OWN_METRICS)
    server = start_server(app_dir, WEB_CONCURRENCY="1", GUNICORN_CMD_ARGS="--max-requests 5")
    server.wait_metrics_ready()
    sent = cut = 0

    def recycled_twice() -> bool:
        """Send a few more requests until the master has counted two recycles: Uvicorn checks its limit
        on a 0.1 s tick, so how many requests a worker serves past 5 depends on how fast they come."""
        nonlocal sent, cut
        if value(scrape(server), "gunicorn_worker_exits_total", reason="max_requests") >= 2:
            return True
        for _ in range(3):
            try:
                status = client.get(server.url + "/", timeout=10, headers={"Connection": "close"}).status_code
            except httpx.TransportError:
                cut += 1  # cut by a worker being recycled; the master's listening socket stays open
                continue
            if status == 200:
                sent += 1
        assert cut < 12, "the server stopped answering"
        return False

    wait_until(recycled_twice, 30, "two recycles to be counted")
    # every answered request is counted (plus the readiness probe); one cut by a recycle may be too
    answered = sent + 1
    text = scrape_until(
        server,
        lambda t: answered <= http_total(t, "/", "200") <= answered + cut,
        f"{answered} requests counted",
    )
    assert value(text, "gunicorn_worker_exits_total", reason="crash") == 0


def test_metrics_process_comes_back_and_app_keeps_serving(server):
    wait_until(lambda: len(server.metrics_peers()) == 2, 10, "both metrics peers")
    old = server.metrics_peers()[0]
    old.kill()
    assert server.get("/").status_code == 200  # the app does not notice
    assert server.metrics_get("/healthz").status_code == 200  # the other peer answers meanwhile

    wait_until(
        lambda: server.metrics_peer_replaced(old), 5, "the killed metrics peer to be replaced within 5 s"
    )
    assert server.logs().count("starting a replacement") == 1
    promtool_check(scrape(server))


def test_slow_scrapers_do_not_block_health_or_app(server):
    idle = []
    for _ in range(8):  # connections that never send a request, like a stuck scraper
        sock = socket.create_connection(("127.0.0.1", server.metrics_port))
        idle.append(sock)
    try:
        assert server.metrics_get("/healthz").status_code == 200
        assert server.get("/").status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_master_has_no_threads_and_no_fork_warnings(server):
    server.get("/")
    assert server.master().num_threads() == 1
    logs = server.logs()
    assert "DeprecationWarning" not in logs and "fork()" not in logs


def test_stop_leaves_nothing_running_and_finishes_in_flight(server):
    import threading

    result = {}

    def slow_request():
        result["response"] = client.get(server.url + "/slow?seconds=2", timeout=15)

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(
        lambda: any(
            c.status == "ESTABLISHED" and c.laddr.port == server.port
            for w in server.workers()
            for c in w.net_connections()
        ),
        5,
        "the request in flight",
    )
    server.proc.send_signal(signal.SIGTERM)
    thread.join(20)
    assert result["response"].json() == {"slept": 2.0}
    assert server.proc.wait(20) == 0
    server.wait_all_gone()
    assert not os.path.exists(server.env["PROMETHEUS_MULTIPROC_DIR"])  # nothing left in memory either


def test_metrics_port_taken_fails_in_one_line(start_server, app_dir):
    write_app(app_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(app_dir, METRICS_PORT=str(port), wait=None)
        logs = server.failed_start_logs()
    assert f"METRICS_PORT={port} is already in use on 127.0.0.1" in logs


# A config file that waits until the metrics server answers (it starts before Gunicorn reads this file),
# then makes the app's bind the metrics port: a mistake found after the metrics side is running.
CONF_FAILING_ONCE_METRICS_ANSWER = """
    import http.client
    import os
    import time

    port = int(os.environ["METRICS_PORT"])
    deadline = time.monotonic() + 30
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            connection.request("GET", "/healthz")
            print(f"metrics answered {connection.getresponse().status}", flush=True)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        finally:
            connection.close()
    bind = f"127.0.0.1:{port}"
"""


def test_a_start_failing_after_the_metrics_side_started_leaves_nothing_behind(start_server, app_dir):
    write_app(app_dir)
    (app_dir / "gunicorn_conf.py").write_text(textwrap.dedent(CONF_FAILING_ONCE_METRICS_ANSWER))
    server = start_server(app_dir, wait=None)
    logs = server.failed_start_logs()
    assert "metrics answered 503" in logs  # no worker yet: the metrics side was up and serving
    errors = [line for line in logs.splitlines() if "configuration error" in line]
    assert len(errors) == 1 and f"port {server.metrics_port} is the metrics port" in errors[0], logs
    assert not server.session_processes()  # stopped by the master before it exited, not after
    assert not os.path.exists(server.env["PROMETHEUS_MULTIPROC_DIR"])  # released too


def test_multiproc_dir_must_be_a_directory(start_server, app_dir, tmp_path):
    write_app(app_dir)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    server = start_server(app_dir, PROMETHEUS_MULTIPROC_DIR=str(not_a_dir), wait=None)
    logs = server.failed_start_logs()
    assert f"PROMETHEUS_MULTIPROC_DIR='{not_a_dir}' is invalid: it exists and is not a directory" in logs


def test_stale_files_are_removed_at_start(start_server, app_dir, tmp_path):
    write_app(app_dir)
    directory = tmp_path / "stale-dir"
    directory.mkdir()
    stale = "counter_1.db"
    (directory / stale).write_bytes(b"\0" * 64)
    (directory / "not-ours.txt").write_text("keep me")
    server = start_server(app_dir, WEB_CONCURRENCY="1", PROMETHEUS_MULTIPROC_DIR=str(directory))
    server.wait_metrics_ready()
    assert not (directory / stale).exists()
    assert (directory / "not-ours.txt").exists()
    promtool_check(scrape(server))


def test_instrumentation_can_be_turned_off(start_server, app_dir):
    write_app(app_dir, APP_WITH_OWN_METRICS)
    server = start_server(app_dir, WEB_CONCURRENCY="1", METRICS_INSTRUMENT="false")
    server.wait_metrics_ready()
    server.get("/")
    client.post(server.url + "/orders/pen", timeout=10)
    text = scrape_until(server, lambda t: value(t, "shop_orders_total", kind="pen") == 1, "the app's counter")
    assert "starlette_requests_total" not in text


APP_WITH_STARLETTE_EXPORTER = """
    from fastapi import FastAPI
    from starlette_exporter import PrometheusMiddleware

    app = FastAPI()
    app.add_middleware(PrometheusMiddleware)


    @app.get("/items/{item_id}")
    def read_item(item_id: int):
        return {"item_id": item_id}
"""


def test_an_app_running_its_own_starlette_exporter_keeps_a_valid_exposition(start_server, app_dir):
    """Users moving over from starlette_exporter may keep it: its families (same names as ours) are
    served as the app's own, ours stand aside, and the scrape stays valid (one family per name)."""
    write_app(app_dir, APP_WITH_STARLETTE_EXPORTER)
    server = start_server(app_dir, WEB_CONCURRENCY="1")
    server.wait_metrics_ready()
    for item in range(3):
        assert server.get(f"/items/{item}").json() == {"item_id": item}
    text = scrape_until(
        server, lambda t: http_total(t, "/items/{item_id}", "200") == 3, "the app's own count"
    )
    promtool_check(text)
    assert len(re.findall(r"^# TYPE starlette_request_duration_seconds ", text, re.M)) == 1
    assert "serving the app's, not ours" in server.logs()


def test_settings_shape_the_http_metrics(start_server, app_dir):
    write_app(app_dir, APP_WITH_OWN_METRICS)
    server = start_server(
        app_dir,
        WEB_CONCURRENCY="1",
        METRICS_APP_NAME="shop",
        METRICS_BUCKETS="0.1,1",
        METRICS_SKIP_PATHS="/",
        METRICS_FLUSH_INTERVAL="0.1",  # removed setting: accepted, ignored, said once
    )
    assert "flush_interval" not in server.config()
    assert server.logs().count("METRICS_FLUSH_INTERVAL is deprecated and ignored") == 1
    server.wait_metrics_ready()
    server.get("/")
    server.get("/items/1")
    for i in range(3):
        server.get(f"/random-scan-{i}")

    def totals(text: str) -> dict[str, float]:
        return {
            dict(labels)["path"]: v
            for (name, labels), v in samples(text).items()
            if name == "starlette_requests_total"
        }

    expected = {"/items/{item_id}": 1, "__unknown__": 3}
    text = scrape_until(server, lambda t: totals(t) == expected, "the grouped totals, / skipped")
    promtool_check(text)
    assert 'app_name="shop"' in text
    buckets = {
        dict(labels)["le"]
        for (name, labels) in samples(text)
        if name == "starlette_request_duration_seconds_bucket"
    }
    assert buckets == {"0.1", "1.0", "+Inf"}


def test_exact_counts_under_concurrent_load(server):
    """N = 10,000 mixed requests over two workers; every label set sums to exactly what was sent."""
    plan = [
        ("GET", "/"),
        ("GET", "/items/5?q=x"),
        ("GET", "/teapot"),
        ("GET", "/nowhere"),
        ("GET", "/boom"),
        ("POST", "/orders/pen"),
    ]
    total = 10_000
    sent: dict[tuple[str, str, str], int] = {("GET", "/", "200"): 1}  # the fixture's readiness probe
    templates = {
        "/": "/",
        "/items/5?q=x": "/items/{item_id}",
        "/teapot": "/teapot",
        "/nowhere": "__unknown__",
        "/boom": "/boom",
        "/orders/pen": "/orders/{kind}",
    }

    plan_sent = [plan[i % len(plan)] for i in range(total)]
    for method, path, status in send_all(
        "127.0.0.1",
        server.port,
        plan_sent,
        connections=16,
        closing={"/boom"},  # Uvicorn drops those
    ):
        key = (method, templates[path], str(status))
        sent[key] = sent.get(key, 0) + 1
    assert sum(sent.values()) == total + 1
    assert ("GET", "/boom", "500") in sent and ("GET", "__unknown__", "404") in sent

    def counted(text: str) -> dict[tuple[str, str, str], float]:
        found = {}
        for (name, labels), v in samples(text).items():
            if name == "starlette_requests_total":
                lab = dict(labels)
                found[(lab["method"], lab["path"], lab["status_code"])] = v
        return found

    text = scrape_until(server, lambda t: sum(counted(t).values()) >= total + 1, f"{total} requests counted")
    promtool_check(text)
    assert counted(text) == sent


VENV_PYTHON = VENV_BIN / "python"


def healthcheck(server) -> int:
    return subprocess.run(
        [str(VENV_PYTHON), "-m", "gunicorn_prometheus", "healthcheck"], env=server.env, timeout=30
    ).returncode


def test_image_healthcheck_command(server):
    assert healthcheck(server) == 0
    server.stop()
    assert healthcheck(server) == 1


def test_image_healthcheck_under_reload(start_server, app_dir):
    write_app(app_dir)
    server = start_server(app_dir, script="start-reload.sh")
    assert healthcheck(server) == 0


def test_reload_with_sighup_keeps_counts_and_reuses_slots(server):
    spread_requests(server, "GET", "/", 10)
    scrape_until(server, lambda t: http_total(t, "/", "200") == 11, "11 requests before the reload")
    old = {w.pid for w in server.workers()}
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: value(scrape(server), "gunicorn_worker_boots_total") == 4, 30, "two new workers")
    wait_until(lambda: not old & {w.pid for w in server.workers()}, 30, "the old workers to be gone")
    spread_requests(server, "GET", "/", 5)
    text = scrape_until(server, lambda t: http_total(t, "/", "200") == 16, "16 requests after the reload")
    promtool_check(text)
    assert value(text, "gunicorn_worker_exits_total", reason="clean") == 2
    directory = server.env["PROMETHEUS_MULTIPROC_DIR"]
    slot_files = {f.rsplit("_", 1)[1] for f in os.listdir(directory) if f.endswith(".db")}
    assert slot_files <= {"master.db", "w0.db", "w1.db", "w2.db", "w3.db"}, slot_files


def test_ttin_and_ttou_change_the_desired_workers(server):
    server.proc.send_signal(signal.SIGTTIN)
    wait_until(lambda: value(scrape(server), "gunicorn_workers_alive") == 3, 30, "a third worker")
    assert value(scrape(server), "gunicorn_workers_desired") == 3
    server.proc.send_signal(signal.SIGTTOU)
    wait_until(lambda: value(scrape(server), "gunicorn_workers_desired") == 2, 30, "back to two desired")
    wait_until(lambda: value(scrape(server), "gunicorn_workers_alive") == 2, 30, "back to two workers")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signals_end_quickly_and_completely(server, sig):
    server.proc.send_signal(sig)
    assert server.proc.wait(15) == 0
    server.wait_all_gone()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_reload_mode_stops_on_signals(start_server, app_dir, sig):
    """Upstream's start-reload.sh could need `docker kill`; ours stops on Ctrl-C and on docker stop."""
    write_app(app_dir)
    server = start_server(app_dir, script="start-reload.sh")
    server.proc.send_signal(sig)
    server.proc.wait(15)
    server.wait_all_gone()


@pytest.mark.parametrize("worker_class", ["asgi", "uvicorn.workers.UvicornWorker"])
def test_other_worker_classes_are_instrumented(start_server, app_dir, worker_class):
    write_app(app_dir, APP_WITH_OWN_METRICS)
    server = start_server(app_dir, WEB_CONCURRENCY="1", WORKER_CLASS=worker_class)
    server.wait_metrics_ready()
    assert server.get("/items/2").json() == {"item_id": 2, "q": None}
    assert f"Using worker: {worker_class}" in server.logs()
    scrape_until(server, lambda t: http_total(t, "/items/{item_id}", "200") == 1, "the request counted")
