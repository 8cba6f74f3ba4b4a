"""A real Prometheus server (Debian's `prometheus` package) scraping a target, and its query API."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import httpx

from tests.support import client
from tests.support.net import free_port


class PrometheusStarter:
    """Starts Prometheus on loopback with 1 s scrapes of one target; `stop_all` ends every one started."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.procs: list[subprocess.Popen] = []

    def __call__(
        self, target: str, rule_files: tuple[str, ...] = (), job: str = "", flags: tuple[str, ...] = ()
    ) -> str:
        """Start a Prometheus scraping `target` (host:port) and evaluating `rule_files`; return its URL.

        `job`: more YAML lines of the scrape job (e.g. `scheme`, `basic_auth`, `tls_config`), unindented.
        `flags`: extra command-line flags, e.g. `--enable-feature=exemplar-storage`.
        """
        binary = shutil.which("prometheus")
        assert binary, "the Debian package `prometheus` is missing: run scripts/install --test"
        port = free_port()
        home = self.work_dir / f"prometheus-{len(self.procs)}"
        home.mkdir()
        config = home / "prometheus.yml"
        config.write_text(
            textwrap.dedent(f"""
            global:
              scrape_interval: 1s
              scrape_timeout: 1s
              evaluation_interval: 1s
            rule_files: {list(rule_files)!r}
            scrape_configs:
              - job_name: app
                static_configs:
                  - targets: ["{target}"]
            """)
            + textwrap.indent(textwrap.dedent(job), "    ")
        )
        with (home / "prometheus.log").open("wb") as log:
            self.procs.append(
                subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={home / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        *flags,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        return f"http://127.0.0.1:{port}"

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query(base: str, expr: str) -> list[dict]:
    """The result of an instant query; empty while Prometheus is not up yet or the query fails."""
    try:
        response = client.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    except httpx.HTTPError:
        return []
    if response.status_code != 200:
        return []
    return response.json()["data"]["result"]
