#!/usr/bin/env python3
"""Render docs/dashboard.png: the dashboard's main panels, from a real Prometheus scraping a real server.

Grafana cannot run here, so the picture is drawn with matplotlib from the same queries: the panels'
expressions are read from grafana/dashboard.json (variables substituted as Grafana would), sent to
Prometheus' query_range API, and each series is drawn with the panel's legend format. What runs:

- the image's /start.sh with 2 workers on loopback, serving an app with fast, slow (async and sync) and
  failing routes;
- Debian's Prometheus on loopback, scraping the metrics port every second and loading deploy/rules.yml;
- a minute of steady traffic (so that the recorded 1-minute rates are settled), then 80 s of scripted
  traffic, the window drawn: steady fast requests, a phase of slow awaited calls, a phase where a
  route fails half of the time with 503, a burst of concurrent sync requests (thread pool), and one worker
  replaced half-way (SIGTERM to it, as a rolling restart does).

Needs scripts/install --test and the docs extra (`.venv/bin/pip install -e '.[docs]'`: matplotlib).
Usage: python3 docs/dashboard_png.py [--warmup 60] [--seconds 80] [--output docs/dashboard.png]
(about 2.5 minutes).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
if sys.prefix == sys.base_prefix and VENV_PYTHON.exists():  # started with a system python: use the venv
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])

import httpx  # noqa: E402  (after the re-exec into the venv)
import psutil  # noqa: E402

STEP = 2  # seconds between points of the query_range answers
RATE_INTERVAL = "20s"  # what Grafana would use for 1 s scrapes at this zoom
APP = """
    import asyncio
    import random
    import time

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()


    @app.get("/")
    async def root():
        return {"Hello": "World"}


    @app.get("/items/{item_id}")
    async def read_item(item_id: int, q: str | None = None):
        return {"item_id": item_id, "q": q}


    @app.get("/search")
    async def search():
        await asyncio.sleep(random.uniform(0.15, 0.6))  # an awaited upstream call
        return {"hits": 3}


    @app.get("/report")
    def report():
        time.sleep(random.uniform(0.05, 0.25))  # sync work: runs in the thread pool
        return {"rows": 10}


    @app.get("/checkout")
    async def checkout():
        if random.random() < 0.5:
            return JSONResponse({"detail": "payment provider unavailable"}, status_code=503)
        return {"ok": True}
"""
# The panels drawn, in order: (titles, y-axis unit); the first title whose queries return data is drawn
# (a metric that is not served yet leaves its panel empty in Grafana too). The queries come from the
# dashboard itself.
PANELS = [
    (("Request rate by path and status",), "req/s"),
    (("Error ratio (5xx)",), "ratio"),
    (("Latency p50 / p95 / p99",), "s"),
    (("Latency p95 by path",), "s"),
    (("Workers desired / alive / serving",), "workers"),
    (("Worker boots and exits by reason",), "per interval"),
    (("CPU per process",), "cores"),
    (("Resident memory per process",), "MiB"),
    (("Event-loop lag p99 by worker", "Requests in progress"), "s"),
    (("Thread pool: tokens in use vs limit, waiting", "Threads"), "tokens"),
    (("Listen backlog vs limit", "Open file descriptors"), "connections"),
    (("Scrape duration", "Requests in progress"), "s"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise SystemExit(f"dashboard-png: timed out waiting for {what}")
        time.sleep(0.2)


def start_server(tmp: Path) -> tuple[subprocess.Popen, int, int]:
    app_dir = tmp / "app"
    app_dir.mkdir()
    (app_dir / "main.py").write_text(textwrap.dedent(APP))
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN", "WEB_", "METRICS_"))}
    env.update(
        PATH=f"{VENV_PYTHON.parent}{os.pathsep}{env.get('PATH', '')}",
        APP_DIR=str(app_dir),
        DEFAULT_GUNICORN_CONF=str(REPO / "gunicorn_conf.py"),
        HOST="127.0.0.1",
        PORT=str(port),
        METRICS_HOST="127.0.0.1",
        METRICS_PORT=str(metrics_port),
        PROMETHEUS_MULTIPROC_DIR=str(tmp / "multiproc"),
        WEB_CONCURRENCY="2",
    )
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(REPO / "image" / "start.sh")],
        env=env,
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200, 60, "the app")
    wait_for(
        lambda: httpx.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=2).status_code == 200,
        60,
        "/healthz",
    )
    return proc, port, metrics_port


def start_prometheus(tmp: Path, metrics_port: int) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if not binary:
        raise SystemExit("dashboard-png: Debian's prometheus is missing: run scripts/install --test")
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        textwrap.dedent(f"""
        global:
          scrape_interval: 1s
          scrape_timeout: 1s
          evaluation_interval: 1s
        rule_files: ["{REPO / "deploy" / "rules.yml"}"]
        scrape_configs:
          - job_name: app
            static_configs:
              - targets: ["127.0.0.1:{metrics_port}"]
        """)
    )
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: query(base, "up == 1"), 60, "Prometheus' first scrape")
    return proc, base


def query(base: str, expr: str) -> list[dict]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    return response.json()["data"]["result"] if response.status_code == 200 else []


def query_range(base: str, expr: str, start: float, end: float) -> list[dict]:
    params = {"query": expr, "start": start, "end": end, "step": STEP}
    response = httpx.get(f"{base}/api/v1/query_range", params=params, timeout=30)
    response.raise_for_status()
    return response.json()["data"]["result"]


def workers(server: subprocess.Popen) -> list[psutil.Process]:
    """The master's worker processes: the only children whose command line names Gunicorn (the metrics
    processes never do; upstream's harness counts processes the same way)."""
    found = []
    for child in psutil.Process(server.pid).children():
        try:
            if "gunicorn" in " ".join(child.cmdline()).lower():
                found.append(child)
        except psutil.Error:
            continue
    return found


def drive_traffic(port: int, warmup: float, seconds: float, server: subprocess.Popen) -> float:
    """The scripted mix, from a few threads at a modest rate (the machine is shared).

    A warm-up of the steady mix comes first, so that the recorded 1-minute rates are settled when the
    scripted window starts (a series younger than its rate window reads low); returns the wall-clock
    time the window started.
    """
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic() + warmup  # phase() < 0 during the warm-up
    stop = threading.Event()

    def phase() -> float:
        return (time.monotonic() - started) / seconds

    def loop(choose, pause: float) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            while not stop.is_set():
                path = choose(phase())
                if path:
                    try:
                        client.get(path)
                    except httpx.HTTPError:
                        pass
                time.sleep(pause * random.uniform(0.5, 1.5))

    def fast(p: float) -> str:
        return random.choice(["/", "/items/1?q=x", f"/items/{random.randint(1, 99)}"])

    def slow(p: float) -> str | None:
        return "/search" if 0.25 < p < 0.75 else ("/search" if random.random() < 0.2 else None)

    def sync(p: float) -> str | None:
        return "/report"

    def sync_burst(p: float) -> str | None:
        return "/report" if 0.6 < p < 0.75 else None

    def failing(p: float) -> str | None:
        return "/checkout" if 0.45 < p < 0.8 else ("/checkout" if random.random() < 0.1 else None)

    threads = [threading.Thread(target=loop, args=(fast, 0.03)) for _ in range(3)]
    threads += [threading.Thread(target=loop, args=(slow, 0.1)) for _ in range(2)]
    threads += [
        threading.Thread(target=loop, args=(sync, 0.3)),
        threading.Thread(target=loop, args=(failing, 0.1)),
        threading.Thread(target=loop, args=(failing, 0.1)),
    ]
    threads += [threading.Thread(target=loop, args=(sync_burst, 0.01)) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(warmup)
        window_start = time.time()
        time.sleep(seconds / 2)
        victim = workers(server)[0]
        print(f"dashboard-png: replacing worker {victim.pid} (SIGTERM)", file=sys.stderr)
        victim.send_signal(signal.SIGTERM)
        time.sleep(seconds / 2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return window_start


def panel_queries() -> dict[str, list[tuple[str, str]]]:
    dashboard = json.loads((REPO / "grafana" / "dashboard.json").read_text())
    found = {}
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found[inner["title"]] = [(t["expr"], t.get("legendFormat", "")) for t in inner.get("targets", [])]
    return found


def substitute(expr: str) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in ("job", "instance", "app_name"):
        expr = expr.replace(f"${name}", ".*")
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return re.sub(r"\s*127\.0\.0\.1:\d+", "", text).strip() or "value"


def render(base: str, start: float, end: float, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = panel_queries()
    plt.style.use("dark_background")
    figure, axes = plt.subplots(4, 3, figsize=(18, 15), dpi=90)
    figure.patch.set_facecolor("#111217")
    for axis, (titles, unit) in zip(axes.flat, PANELS, strict=True):
        axis.set_facecolor("#181b1f")
        title, drawn = titles[0], 0
        for candidate in titles:
            answers = [
                (fmt, series)
                for expr, fmt in queries[candidate]
                for series in query_range(base, substitute(expr), start, end)
            ]
            if answers:
                title = candidate
                break
        axis.set_title(title, loc="left", fontsize=11, color="#d8d9da")
        for fmt, series in answers:
            times = [float(t) - start for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            if unit == "MiB":
                values = [v / 2**20 for v in values]
            axis.plot(times, values, linewidth=1.4, label=legend(fmt, series["metric"]))
            drawn += 1
        if drawn:
            axis.legend(fontsize=7, loc="upper left", ncol=2, framealpha=0.4)
        else:
            axis.text(
                0.5,
                0.5,
                "no data: metric not served yet",
                ha="center",
                va="center",
                transform=axis.transAxes,
                color="#8e8e8e",
            )
        if title in ("Requests in progress", "Threads"):
            unit = "requests" if title == "Requests in progress" else "threads"
        elif title == "Open file descriptors":
            unit = "fds"
        axis.set_ylabel(unit, fontsize=8, color="#8e8e8e")
        axis.set_xlabel("seconds", fontsize=8, color="#8e8e8e")
        axis.tick_params(labelsize=7, colors="#8e8e8e")
        axis.grid(color="#2c3235", linewidth=0.6)
        axis.set_ylim(bottom=0)
    figure.suptitle(
        "Gunicorn + Uvicorn (gunicorn-prometheus): the dashboard's panels over "
        f"{round(end - start)} s of scripted traffic, from a real Prometheus "
        "(fast, slow and failing routes; one worker replaced half-way)",
        fontsize=12,
        color="#d8d9da",
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, facecolor=figure.get_facecolor())
    print(f"dashboard-png: wrote {output}", file=sys.stderr)


def stop(proc: subprocess.Popen | None, session: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    if session:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        if session:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=60)
    parser.add_argument("--seconds", type=float, default=80)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args()
    server = prometheus = None
    with tempfile.TemporaryDirectory(prefix="dashboard-png-") as directory:
        tmp = Path(directory)
        try:
            server, port, metrics_port = start_server(tmp)
            prometheus, base = start_prometheus(tmp, metrics_port)
            start = drive_traffic(port, args.warmup, args.seconds, server)
            time.sleep(3)  # the last scrapes and rule evaluations
            render(base, start, time.time(), args.output)
        finally:
            stop(prometheus)
            stop(server, session=True)


if __name__ == "__main__":
    main()
