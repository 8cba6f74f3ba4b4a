"""The image's lock file (image/requirements.txt, written by scripts/lock) still satisfies the package's
dependencies on every Python of the tag matrix, with a hash for every pin: the image build installs from it
with --require-hashes, so a stale lock shows up here rather than as an image without a dependency."""

from __future__ import annotations

import json
import re
from importlib.metadata import requires

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support.paths import REPO

LOCK = REPO / "image" / "requirements.txt"
PYTHONS = json.loads((REPO / "image" / "tags.json").read_text())["pythons"]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)==(?P<version>\S+)(?:\s*;\s*(?P<marker>[^\\]+?))?\s*\\?$")


def pins() -> list[tuple[str, Version, Marker | None, int]]:
    """(name, version, marker, number of hashes) of every pin of the lock."""
    found: list[tuple[str, Version, Marker | None, int]] = []
    for line in LOCK.read_text().splitlines():
        if match := PIN.match(line):
            marker = Marker(match["marker"]) if match["marker"] else None
            found.append((canonicalize_name(match["name"]), Version(match["version"]), marker, 0))
        elif line.strip().startswith("--hash=sha256:") and found:
            name, version, marker, hashes = found[-1]
            found[-1] = (name, version, marker, hashes + 1)
    return found


def environment(python: str) -> dict[str, str]:
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "extra": "",
    }


def image_requirements() -> list[Requirement]:
    """The package's own dependencies and its `fastapi` extra (what the image installs)."""
    found = []
    for text in requires("gunicorn-prometheus") or []:
        requirement = Requirement(text)
        marker = str(requirement.marker or "")
        if "extra" not in marker or 'extra == "fastapi"' in marker:
            found.append(requirement)
    return found


def test_every_pin_has_hashes():
    locked = pins()
    assert len(locked) >= 15
    assert [name for name, _, _, hashes in locked if hashes == 0] == []


def test_lock_satisfies_every_dependency_on_every_python():
    locked = pins()
    problems = []
    for python in PYTHONS:
        env = environment(python)
        versions = {name: v for name, v, marker, _ in locked if marker is None or marker.evaluate(env)}
        for requirement in image_requirements():
            if requirement.marker and not requirement.marker.evaluate({**env, "extra": "fastapi"}):
                continue
            name = canonicalize_name(requirement.name)
            if name not in versions:
                problems.append(f"Python {python}: {requirement} is not in the lock")
            elif versions[name] not in requirement.specifier:
                problems.append(f"Python {python}: {name}=={versions[name]} does not satisfy {requirement}")
    assert problems == [], "run scripts/lock:\n" + "\n".join(problems)
