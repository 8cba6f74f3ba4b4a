"""How many CPUs this process may really use, and why.

`os.cpu_count()` is the host's count: a container limited to 2 CPUs on a 64-core node would start 64
workers. The real limit is the smallest of the cgroup CPU quota (v2 `cpu.max`, v1 CFS quota/period,
rounded up) and the CPU affinity mask (cpuset). Every input is injectable, so tests give fake cgroup
trees instead of needing a container.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuLimit:
    """The usable CPU count and the limit it came from (printed in the start-up JSON)."""

    count: int
    source: str


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """Map controller ("" for cgroup v2) to this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _candidate_dirs(mount: Path, own_path: str | None) -> list[Path]:
    """The process's own cgroup and each ancestor up to the mount: a parent's quota binds too.

    Inside a container with a cgroup namespace the own path is "/", so only the mount itself is read.
    """
    dirs = [mount]
    if own_path and own_path != "/":
        current = mount
        for part in Path(own_path).relative_to("/").parts:
            current = current / part
            dirs.append(current)
    return [d for d in dirs if d.is_dir()]


def _quota_v2(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    try:
        q, p = int(quota), int(period or "100000")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _quota_v1(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        q, p = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_quota(
    cgroup_root: Path, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> tuple[float, str] | None:
    """The tightest CPU quota found in cgroup v2 or v1, in CPUs, with its source; None when unlimited."""
    own = _own_cgroup_paths(proc_cgroup)
    found: list[tuple[float, str]] = []
    if (cgroup_root / "cgroup.controllers").exists():  # the unified (v2) hierarchy is mounted here
        for d in _candidate_dirs(cgroup_root, own.get("")):
            if (quota := _quota_v2(d)) is not None:
                found.append((quota, "cgroup2 cpu.max"))
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        mount = cgroup_root / name
        if mount.is_dir():
            for d in _candidate_dirs(mount, own.get("cpu")):
                if (quota := _quota_v1(d)) is not None:
                    found.append((quota, "cgroup1 cpu.cfs_quota_us"))
            break
    if not found and (cgroup_root / "cpu.cfs_quota_us").exists():  # v1 cpu controller mounted at the root
        if (quota := _quota_v1(cgroup_root)) is not None:
            found.append((quota, "cgroup1 cpu.cfs_quota_us"))
    return min(found) if found else None


def affinity_count() -> int | None:
    """CPUs in this process's affinity mask (a cpuset limit shows here), where the platform has one."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def detect(
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    affinity: int | None = -1,
    host_count: int | None = -1,
) -> CpuLimit:
    """Usable CPUs: the smallest of quota (rounded up), affinity and host count, and at least 1.

    `affinity` and `host_count` default to the real ones (-1); pass a number or None to fake them.
    """
    if affinity == -1:
        affinity = affinity_count()
    if host_count == -1:
        host_count = os.cpu_count()
    candidates: list[tuple[int, str]] = []
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        candidates.append((max(1, math.ceil(quota[0] - 1e-9)), f"{quota[1]} ({quota[0]:g} CPUs)"))
    if affinity:
        candidates.append((affinity, "sched_getaffinity"))
    if host_count:
        candidates.append((host_count, "os.cpu_count"))
    if not candidates:
        return CpuLimit(1, "unknown (assumed 1)")
    # On a tie the more specific source (quota, then affinity) is named: it is the one that binds.
    count, source = min(candidates, key=lambda c: c[0])
    return CpuLimit(max(1, count), source)


def worker_count(
    cpus: int, workers_per_core: float, max_workers: int | None, web_concurrency: int | None
) -> int:
    """Upstream's formula on the real CPU count: max(int(cpus * per_core), 2), capped by MAX_WORKERS.

    WEB_CONCURRENCY replaces the computation; MAX_WORKERS of 0 means no cap, and the cap is applied after
    the floor of 2, so MAX_WORKERS=1 gives one worker (both exactly as upstream).
    """
    if web_concurrency:
        return web_concurrency
    workers = max(int(cpus * workers_per_core), 2)
    if max_workers:
        workers = min(workers, max_workers)
    return workers
