"""Python snippets run in a fresh interpreter: for what must not touch the test process's global state
(prometheus_client's default registry, multiprocess mode, atexit hooks) or must happen in another process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.paths import REPO


def run_python(code: str, *args: str, multiproc_dir: Path | None = None, timeout: float = 60) -> str:
    """Run `code` (dedented) with this interpreter from the checkout's root (so `tests.support` imports);
    return its stdout, or fail with its stderr. `multiproc_dir` sets PROMETHEUS_MULTIPROC_DIR for it."""
    env = dict(os.environ)
    if multiproc_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"the child exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout
