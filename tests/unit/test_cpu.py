"""CPU detection against fake cgroup trees: v2, v1, no limit, fractional quotas, nested cgroups."""

from pathlib import Path

import pytest

from gunicorn_prometheus import cpu


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_root(tmp_path: Path, cpu_max: str | None) -> Path:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    if cpu_max is not None:
        write(root / "cpu.max", cpu_max + "\n")
    return root


def v1_root(tmp_path: Path, quota: int, period: int = 100000, mount: str = "cpu,cpuacct") -> Path:
    root = tmp_path / "cgroup"
    write(root / mount / "cpu.cfs_quota_us", f"{quota}\n")
    write(root / mount / "cpu.cfs_period_us", f"{period}\n")
    return root


NO_PROC = Path("/nonexistent/proc/self/cgroup")


def detect(
    root: Path, affinity: int | None = 64, host: int | None = 64, proc: Path = NO_PROC
) -> cpu.CpuLimit:
    return cpu.detect(root, proc, affinity=affinity, host_count=host)


def test_cgroup_v2_quota_binds(tmp_path):
    assert detect(v2_root(tmp_path, "200000 100000")) == cpu.CpuLimit(2, "cgroup2 cpu.max (2 CPUs)")


def test_cgroup_v2_fractional_quota_rounds_up(tmp_path):
    limit = detect(v2_root(tmp_path, "150000 100000"))
    assert limit.count == 2 and limit.source.startswith("cgroup2")


def test_cgroup_v2_tiny_quota_gives_at_least_one(tmp_path):
    assert detect(v2_root(tmp_path, "10000 100000")).count == 1


def test_cgroup_v2_unlimited_falls_back_to_affinity(tmp_path):
    assert detect(v2_root(tmp_path, "max 100000"), affinity=3) == cpu.CpuLimit(3, "sched_getaffinity")


def test_cgroup_v1_quota(tmp_path):
    limit = detect(v1_root(tmp_path, 300000))
    assert limit == cpu.CpuLimit(3, "cgroup1 cpu.cfs_quota_us (3 CPUs)")


def test_cgroup_v1_fractional_quota_with_other_period(tmp_path):
    assert detect(v1_root(tmp_path, 25000, 10000, mount="cpu")).count == 3  # 2.5 CPUs


def test_cgroup_v1_no_limit(tmp_path):
    assert detect(v1_root(tmp_path, -1), affinity=None, host=8) == cpu.CpuLimit(8, "os.cpu_count")


def test_affinity_smaller_than_quota_wins(tmp_path):
    assert detect(v2_root(tmp_path, "400000 100000"), affinity=2) == cpu.CpuLimit(2, "sched_getaffinity")


def test_no_cgroup_files_at_all(tmp_path):
    assert detect(tmp_path / "empty", affinity=4, host=16) == cpu.CpuLimit(4, "sched_getaffinity")


def test_nothing_known_assumes_one(tmp_path):
    assert detect(tmp_path / "empty", affinity=None, host=None).count == 1


def test_nested_cgroup_v2_parent_limit_applies(tmp_path):
    root = v2_root(tmp_path, "max 100000")
    write(root / "kubepods" / "cpu.max", "100000 100000\n")
    write(root / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    proc = tmp_path / "proc-self-cgroup"
    write(proc, "0::/kubepods/pod1\n")
    assert detect(root, proc=proc).count == 1


def test_nested_cgroup_v1_own_path(tmp_path):
    root = v1_root(tmp_path, -1)
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    proc = tmp_path / "proc-self-cgroup"
    write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert detect(root, proc=proc).count == 1


def test_garbage_in_cgroup_files_is_ignored(tmp_path):
    assert detect(v2_root(tmp_path, "lots of cpus"), affinity=5).count == 5


def test_real_machine_gives_a_sane_answer():
    limit = cpu.detect()
    assert 1 <= limit.count <= (cpu.os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("cpus", "per_core", "max_workers", "web_concurrency", "expected"),
    [
        (1, 1.0, None, None, 2),  # the floor of 2
        (4, 1.0, None, None, 4),
        (4, 0.5, None, None, 2),
        (4, 2.0, None, None, 8),
        (3, 1.5, None, None, 4),  # int(4.5)
        (8, 1.0, 3, None, 3),
        (8, 1.0, 1, None, 1),  # the cap applies after the floor, like upstream
        (8, 1.0, None, 5, 5),
        (1, 1.0, 1, 7, 7),  # WEB_CONCURRENCY replaces everything
    ],
)
def test_worker_count_matches_upstream_formula(cpus, per_core, max_workers, web_concurrency, expected):
    assert cpu.worker_count(cpus, per_core, max_workers, web_concurrency) == expected
