"""The supported tag matrix has one source, image/tags.json: the workflow, the Dockerfile, the example
project, pyproject.toml and the README must agree with it. No container engine needed."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re

import pytest
import yaml

from tests.support.paths import REPO

WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
DOCKERFILE = REPO / "image" / "Dockerfile"


def _load_matrix_module():
    spec = importlib.util.spec_from_file_location("image_matrix", REPO / "image" / "matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


matrix = _load_matrix_module()
CONFIG = matrix.load()


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@pytest.fixture(scope="module")
def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def test_the_matrix_is_every_python_times_every_variant_times_every_platform():
    assert CONFIG["pythons"] == ["3.10", "3.11", "3.12", "3.13"]
    assert set(CONFIG["variants"]) == {"full", "slim"}
    assert set(CONFIG["platforms"]) == {"linux/amd64", "linux/arm64"}
    images = matrix.images(CONFIG)
    tags = [i["tag"] for i in images]
    assert len(tags) == len(set(tags)) == len(CONFIG["pythons"]) * len(CONFIG["variants"])
    assert "python3.11" in tags and "python3.11-slim" in tags
    builds = matrix.build_matrix(CONFIG)
    assert len(builds) == len(images) * len(CONFIG["platforms"])
    assert len({(b["tag"], b["platform"]) for b in builds}) == len(builds)


def test_latest_is_the_default_python_full_image_like_upstream():
    assert CONFIG["aliases"] == {"latest": f"python{CONFIG['default_python']}"}
    assert CONFIG["default_python"] == "3.11"
    (latest,) = [i for i in matrix.images(CONFIG) if "latest" in i["aliases"]]
    assert latest["variant"] == "full" and latest["base_image"] == "python:3.11"


def test_published_references_include_the_dated_tag():
    refs = matrix.references(CONFIG, "python3.11-slim", "2025-01-06")
    image = CONFIG["image"]
    assert refs == [f"{image}:python3.11-slim", f"{image}:python3.11-slim-2025-01-06"]
    assert f"{image}:latest" in matrix.references(CONFIG, "python3.11", "2025-01-06")


def test_github_output_lines_are_the_matrices(capsys):
    matrix.main(["github"])
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert json.loads(lines["build"]) == matrix.build_matrix(CONFIG)
    assert json.loads(lines["publish"]) == matrix.images(CONFIG)


def test_dockerfile_supports_exactly_the_matrix_pythons():
    text = DOCKERFILE.read_text()
    (line,) = re.findall(r"^# Supported PYTHON_VERSION: ([\d. ]+)", text, re.M)
    assert line.split() == CONFIG["pythons"]
    assert re.search(rf"^ARG PYTHON_VERSION={re.escape(CONFIG['default_python'])}$", text, re.M)
    # The Dockerfile's default base is the slim variant's template.
    slim = CONFIG["variants"]["slim"]["base_image"].replace("{python}", "${PYTHON_VERSION}")
    assert re.search(rf"^ARG BASE_IMAGE={re.escape(slim)}$", text, re.M)


def test_pyproject_supports_the_oldest_python_of_the_matrix():
    (requires,) = re.findall(r'^requires-python\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    oldest = min(CONFIG["pythons"], key=version_key)
    assert requires == f">={oldest}"


def test_example_project_builds_from_the_latest_tag():
    text = (REPO / "examples" / "project" / "Dockerfile").read_text()
    (default,) = re.findall(r"^ARG IMAGE=(\S+)$", text, re.M)
    assert default == f"{CONFIG['image']}:{CONFIG['aliases']['latest']}"


def test_workflow_takes_its_matrices_from_tags_json(workflow):
    jobs = workflow["jobs"]
    run_steps = " ".join(step.get("run", "") for step in jobs["matrix"]["steps"])
    assert "image/matrix.py github" in run_steps
    assert "image/tags.json" in run_steps  # the image name
    assert jobs["build"]["strategy"]["matrix"] == {"include": "${{ fromJSON(needs.matrix.outputs.build) }}"}
    assert jobs["publish"]["strategy"]["matrix"] == {
        "include": "${{ fromJSON(needs.matrix.outputs.publish) }}"
    }
    # No other job hard-codes a matrix.
    for name, job in jobs.items():
        if name not in ("build", "publish"):
            assert "strategy" not in job, name
    assert jobs["build"]["runs-on"] == "${{ matrix.runner }}"
    publish_run = " ".join(step.get("run", "") for step in jobs["publish"]["steps"])
    assert 'image/matrix.py tags "$TAG"' in publish_run
    # Each tag's manifest gathers exactly its own digests: python3.11 must not pick up python3.11-slim's.
    (upload,) = [s for s in jobs["build"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    (download,) = [
        s for s in jobs["publish"]["steps"] if s.get("uses", "").startswith("actions/download-artifact")
    ]
    assert upload["with"]["name"] == "digest-${{ matrix.arch }}-${{ matrix.tag }}"
    assert download["with"]["pattern"] == "digest-*-${{ matrix.tag }}"
    names = {f"digest-{b['arch']}-{b['tag']}" for b in matrix.build_matrix(CONFIG)}
    for image in matrix.images(CONFIG):
        own = {n for n in names if fnmatch.fnmatchcase(n, f"digest-*-{image['tag']}")}
        assert len(own) == len(CONFIG["platforms"]), (image["tag"], own)


def test_workflow_builds_each_entry_with_its_python_base_and_platform(workflow):
    builds = [
        s for s in workflow["jobs"]["build"]["steps"] if s.get("uses", "").startswith("docker/build-push")
    ]
    assert builds, "no docker/build-push-action step"
    for step in builds:
        args = step["with"]
        assert args["file"] == "image/Dockerfile"
        assert args["platforms"] == "${{ matrix.platform }}"
        assert "PYTHON_VERSION=${{ matrix.python }}" in args["build-args"]
        assert "BASE_IMAGE=${{ matrix.base_image }}" in args["build-args"]


def test_workflow_tests_every_build_and_rebuilds_weekly(workflow):
    steps = workflow["jobs"]["build"]["steps"]
    names = [s.get("name", "") for s in steps]
    tests = steps[names.index("Image tests")]
    assert "pytest tests/image" in tests["run"]
    assert tests["env"]["GP_IMAGE"] == "gunicorn-prometheus:ci"
    load = next(s for s in steps if s.get("with", {}).get("load"))
    assert steps.index(load) < steps.index(tests)
    push = steps[names.index("Push by digest (the tested build, from the cache)")]
    assert steps.index(tests) < steps.index(push)
    assert workflow["on"]["schedule"], "no weekly rebuild"
    assert re.fullmatch(r"\d+ \d+ \* \* [0-6]", workflow["on"]["schedule"][0]["cron"])
    # No Python version, variant or platform spelled out anywhere but in setup-python.
    text = WORKFLOW.read_text()
    for python in CONFIG["pythons"]:
        assert f"python{python}" not in text
        assert f"python:{python}" not in text
    assert "linux/arm64" not in text and "linux/amd64" not in text


def test_readme_tag_list_is_generated_from_tags_json():
    readme = REPO / "README.md"
    if not readme.exists() or matrix.README_BEGIN not in readme.read_text():
        pytest.skip("README.md has no generated tag list (python image/matrix.py readme prints it)")
    text = readme.read_text()
    start = text.index(matrix.README_BEGIN)
    end = text.index(matrix.README_END, start) + len(matrix.README_END)
    assert text[start:end] + "\n" == matrix.readme_block(CONFIG), "run: python image/matrix.py readme"
