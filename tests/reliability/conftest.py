"""What the fault tests share: real servers under load, injected faults, exact counts, and figures.

Every test here starts a real master with real workers on loopback ports of its own, drives it with
`load` (client threads with a request budget and a deadline, so no loop runs unbounded), injects a fault
(a SIGKILL, a full or removed directory, a flood of junk), and then compares what the clients saw
answered with what the metrics port counted. Each test records its figures with `figures.record(...)`;
`scripts/reliability-report` runs this directory and renders them into docs/reliability.md.

The server-starting fixtures (start_server, app_dir) are tests/conftest.py's, shared by every test
directory; the framework behind the fixtures below lives in tests/support/faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import RESULTS_ENV, Figures, Load, Peaks


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


@pytest.fixture
def peaks() -> Callable[[Any], Peaks]:
    """`with peaks(server) as p:` samples the server's process tree and metrics directory meanwhile."""

    def make(server: Any) -> Peaks:
        return Peaks(server, Path(server.env["PROMETHEUS_MULTIPROC_DIR"]))

    return make


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    if call.when == "call":
        outcome = "passed" if call.excinfo is None else "failed"
        if item.get_closest_marker("xfail") is not None:
            outcome = "known gap (xfail)" if call.excinfo is not None else "failed (xfail passed)"
        item.reliability_outcome = outcome  # type: ignore[attr-defined]
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
