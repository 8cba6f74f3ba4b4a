"""The Tests workflow (.github/workflows/tests.yml) runs what the README says, on every pull request: the
non-image suite on each Python of image/tags.json and the image tests on the default one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from tests.support.paths import REPO

WORKFLOW = yaml.safe_load((REPO / ".github" / "workflows" / "tests.yml").read_text())
TAGS = json.loads((REPO / "image" / "tags.json").read_text())


def run_step(job: str, tmp_path: Path) -> dict[str, str]:
    """Run a job's shell step here as Actions would, and return what it wrote to $GITHUB_OUTPUT."""
    (step,) = [s for s in WORKFLOW["jobs"][job]["steps"] if "run" in s]
    output = tmp_path / "github_output"
    output.touch()
    subprocess.run(
        ["bash", "-e", "-c", step["run"]],
        cwd=REPO,
        env={"GITHUB_OUTPUT": str(output), "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=60,
    )
    return dict(line.split("=", 1) for line in output.read_text().splitlines())


def test_runs_on_every_pull_request_and_push_to_main():
    triggers = WORKFLOW[True]  # YAML 1.1 reads the key `on` as true
    assert "pull_request" in triggers
    assert triggers["push"]["branches"] == ["main"]


def test_python_versions_come_from_the_tag_matrix(tmp_path):
    outputs = run_step("pythons", tmp_path)
    assert json.loads(outputs["all"]) == TAGS["pythons"]
    assert outputs["default"] == TAGS["default_python"]
    suite = WORKFLOW["jobs"]["suite"]
    assert suite["strategy"]["matrix"]["python"] == "${{ fromJSON(needs.pythons.outputs.all) }}"
    assert suite["strategy"]["fail-fast"] is False


def test_suite_and_image_jobs_run_the_readme_command():
    def command(job: str) -> tuple[str, str]:
        steps = WORKFLOW["jobs"][job]["steps"]
        (setup,) = [s for s in steps if s.get("uses", "").startswith("actions/setup-python@")]
        (run,) = [s["run"] for s in steps if "run" in s]
        return setup["with"]["python-version"], run

    python, run = command("suite")
    assert python == "${{ matrix.python }}"
    assert 'scripts/test -m "not image"' in run
    python, run = command("image")
    assert python == "${{ needs.pythons.outputs.default }}"
    assert "scripts/test -m image" in run
    # root, with the set-up interpreter first on PATH (Debian packages, port 80, tmpfs mounts)
    assert all(r.startswith('sudo env "PATH=$PATH" ') for r in (command("suite")[1], run))
