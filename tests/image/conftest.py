"""Fixtures for the image tests: one image build per run, real containers, everything removed at the end.

The container engine is Docker where a daemon answers, else podman (after `scripts/podman-setup`, which
installs and configures it on a machine without Docker). Environment:

- GP_ENGINE=docker|podman   force the engine.
- GP_IMAGE=<tag>            test an image built elsewhere (CI's buildx job) instead of building one;
                            that image is not removed at the end.
- GP_PYTHON_VERSION=3.11    PYTHON_VERSION build argument (default 3.11). Under podman, scripts/podman-setup
                            makes the base image's stand-in from Debian: 3.11 (bookworm) or 3.13 (trixie);
                            `GP_PYTHON_VERSION=3.13 scripts/test -m image` is the opt-in 3.13 run.
- GP_BASE_IMAGE=<ref>       BASE_IMAGE build argument (default python:$GP_PYTHON_VERSION-slim).
- GP_SKIP_IMAGE_TESTS=1     skip every test marked `image` (test_tag_matrix.py still runs).

Only tests marked `image` use these fixtures; `pytest -m 'not image'` leaves the engine alone.

Every container carries the label `gunicorn-prometheus-tests=<run id>`, so that all of them are removed
even when a test fails half-way; every stop passes an explicit timeout (podman's API defaults to 0).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containers import LABEL, RUN_ID, STOP_TIMEOUT, Container, Engine, docker_answers
from tests.support.paths import REPO


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "image: builds and runs the real container image (podman or Docker)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("GP_SKIP_IMAGE_TESTS", "") not in ("", "0"):
        skip = pytest.mark.skip(reason="GP_SKIP_IMAGE_TESTS is set")
        for item in items:
            if "image" in item.keywords and item.get_closest_marker("image") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    forced = os.environ.get("GP_ENGINE", "")
    if forced == "docker" or (not forced and docker_answers()):
        eng = Engine("docker")
    else:
        python = os.environ.get("GP_PYTHON_VERSION", "3.11")
        setup = subprocess.run(
            ["bash", str(REPO / "scripts" / "podman-setup"), python], capture_output=True, text=True
        )
        if setup.returncode != 0:
            pytest.fail(f"scripts/podman-setup failed:\n{setup.stdout}\n{setup.stderr}")
        eng = Engine(shutil.which("podman") or "podman")
    try:
        yield eng
    finally:
        eng.cleanup()


@pytest.fixture(scope="session")
def image(engine: Engine) -> str:
    """The image under test: built once per run from image/Dockerfile (or GP_IMAGE)."""
    if os.environ.get("GP_IMAGE"):
        return os.environ["GP_IMAGE"]
    version = os.environ.get("GP_PYTHON_VERSION", "3.11")
    tag = f"localhost/gunicorn-prometheus-test:{RUN_ID}"
    build_args = {"PYTHON_VERSION": version}
    if os.environ.get("GP_BASE_IMAGE"):
        build_args["BASE_IMAGE"] = os.environ["GP_BASE_IMAGE"]
    engine.build(tag, REPO, REPO / "image" / "Dockerfile", build_args)
    return tag


@pytest.fixture(scope="session")
def container_factory(engine: Engine):
    """factory(image, env=, files={src: dest}, ports=(80, 9464), args=[...], cmd=[...], start=True)."""

    def make(
        image: str,
        *,
        env: dict[str, str] | None = None,
        files: dict[Path | str, str] | None = None,
        ports: tuple[int, ...] = (80, 9464),
        args: list[str] | None = None,
        cmd: list[str] | None = None,
        start: bool = True,
        fast_health: bool = False,
    ) -> Container:
        name = f"gp-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
        create = ["create", "--name", name, "--label", LABEL, "--stop-timeout", str(STOP_TIMEOUT)]
        if engine.is_podman:
            # Podman runs periodic checks with systemd timers, which this machine lacks: tests run
            # `podman healthcheck run` themselves (the image's HEALTHCHECK command is kept).
            create += ["--health-interval", "disable"]
        elif fast_health:
            create += ["--health-interval", "1s"]
        for port in ports:
            create += ["-p", f"127.0.0.1::{port}"]
        for key, value in (env or {}).items():
            create += ["-e", f"{key}={value}"]
        create += args or []
        create.append(image)
        create += cmd or []
        cid = engine.run(*create).stdout.strip().splitlines()[-1]
        container = Container(engine, cid, name)
        for src, dest in (files or {}).items():
            container.copy_in(src, dest)
        if start:
            container.start()
        return container

    return make


@pytest.fixture
def make_container(engine: Engine, container_factory):
    """Like container_factory; the containers are removed when the test ends (2 cores: few run at once)."""
    made: list[Container] = []

    def make(*args, **kwargs) -> Container:
        container = container_factory(*args, **kwargs)
        made.append(container)
        return container

    yield make
    engine.remove_containers([c.id for c in made])
