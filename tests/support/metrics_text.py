"""Reading a /metrics scrape (Prometheus text format) as a client would, with prometheus_client's parser."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


def samples(text: str) -> dict[tuple[str, Labels], float]:
    """Every sample of the scrape, keyed by (sample name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    """The sample with exactly these labels, 0 when the scrape does not have it (a counter not yet born)."""
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def http_total(text: str, path: str, status: str, method: str = "GET", app: str = "starlette") -> float:
    """starlette_requests_total of one route template, status and method (of the default app name)."""
    return value(text, "starlette_requests_total", app_name=app, method=method, path=path, status_code=status)


def total(
    text: str, name: str, where: Callable[[dict[str, str]], bool] | None = None, **labels: str
) -> float:
    """The sum of the samples named `name` that carry these labels (others may differ) and pass `where`."""
    found = 0.0
    for (sample_name, sample_labels), sample_value in samples(text).items():
        have = dict(sample_labels)
        if sample_name != name or any(have.get(k) != v for k, v in labels.items()):
            continue
        if where is None or where(have):
            found += sample_value
    return found


def promtool_check(text: str) -> None:
    """`promtool check metrics` (Debian's prometheus package) accepts the scrape: lint warnings fail too."""
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
