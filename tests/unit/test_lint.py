"""The repository passes its linters: ruff (lint, format), mypy, hadolint on the Dockerfiles, shellcheck."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO

BIN = Path(sys.executable).parent


def run(*command: str) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}"


def test_ruff_check():
    run(str(BIN / "ruff"), "check", ".")


def test_ruff_format():
    run(str(BIN / "ruff"), "format", "--check", ".")


def test_mypy_package():
    run(str(BIN / "mypy"))  # files and options: [tool.mypy] in pyproject.toml


def test_hadolint_dockerfiles():
    run(str(BIN / "hadolint"), "image/Dockerfile", "examples/project/Dockerfile")


def test_shellcheck_scripts():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "the Debian package `shellcheck` is missing: run scripts/install --test"
    scripts = ["image/start.sh", "image/start-reload.sh", ".ci/run"]
    scripts += [str(p.relative_to(REPO)) for p in sorted((REPO / "scripts").iterdir())]
    run(shellcheck, *scripts)
