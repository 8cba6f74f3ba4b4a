"""Fixtures shared by every test directory: real servers and a real Prometheus, stopped at teardown.

The helpers behind them live in tests/support (import them from there; never import a conftest).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.prometheus import PrometheusStarter
from tests.support.server import ServerStarter


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`), every image test runs in one worker, one after another.

    They share one session-scoped image build (tests/image/conftest.py), which another worker would
    repeat, and each runs several processes in a container: on 2 cores, one image test at a time
    beside the plain-process tests is what the machine holds.
    """
    image_group = pytest.mark.xdist_group("image")
    for item in items:
        if item.get_closest_marker("image") is not None:
            item.add_marker(image_group)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """An empty app directory of the test's own (APP_DIR of the servers it starts)."""
    directory = tmp_path / "app"
    directory.mkdir()
    return directory


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerStarter]:
    """start_server(app_dir, script="start.sh", wait="/", **env): /start.sh on loopback ports of its own."""
    starter = ServerStarter(tmp_path)
    yield starter
    starter.stop_all()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusStarter]:
    """prometheus("127.0.0.1:<port>") -> base URL of a real Prometheus scraping that target every second."""
    starter = PrometheusStarter(tmp_path)
    yield starter
    starter.stop_all()
