"""Per-daemon cgroups: values written, real processes inside, warnings where nothing is writable."""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for

from ikos.platform._cgroups import (
    CgroupManager,
    DaemonCgroup,
    cgroup_settings,
    instance_cgroup_name,
)
from ikos.platform._paths import InstancePaths
from ikos.platform._spawn import ResourceLimits, build_exec_plan, spawn_exec
from ikos.supervision._spec import Exec

# -- pure parts ------------------------------------------------------------------------------


def test_settings_v2_and_v1() -> None:
    limits = ResourceLimits(memory_max=64 << 20, cpu_quota=0.25, tasks_max=16)
    assert cgroup_settings(limits, 2) == {
        "memory_max": [("memory.max", str(64 << 20))],
        "cpu_quota": [("cpu.max", "25000 100000")],
        "tasks_max": [("pids.max", "16")],
    }
    assert cgroup_settings(limits, 1) == {
        "memory_max": [("memory.limit_in_bytes", str(64 << 20))],
        "cpu_quota": [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "25000")],
        "tasks_max": [("pids.max", "16")],
    }
    # The kernel refuses quotas under 1 ms; two CPUs is a quota above the period.
    assert cgroup_settings(ResourceLimits(cpu_quota=0.001), 2)["cpu_quota"] == [
        ("cpu.max", "1000 100000")
    ]
    assert cgroup_settings(ResourceLimits(cpu_quota=2), 1)["cpu_quota"][1] == (
        "cpu.cfs_quota_us",
        "200000",
    )
    assert cgroup_settings(ResourceLimits(nofile=5), 2) == {}


def test_instance_name_is_stable_and_distinct(tmp_path: Path) -> None:
    a = instance_cgroup_name(InstancePaths.for_root(tmp_path / "a"))
    assert a == instance_cgroup_name(InstancePaths.for_root(tmp_path / "a"))
    assert a != instance_cgroup_name(InstancePaths.for_root(tmp_path / "b"))
    assert a.startswith("ikos-") and "/" not in a


def _fake(tmp_path: Path, mountinfo: str, proc_cgroup: str) -> CgroupManager:
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "cgroup").write_text(proc_cgroup)
    return CgroupManager(
        "ikos-fake", mountinfo=str(tmp_path / "mountinfo"), proc_cgroup=str(tmp_path / "cgroup")
    )


def test_no_cgroups_at_all_gives_warnings_not_silence(tmp_path: Path) -> None:
    mgr = _fake(tmp_path, "22 1 0:5 / /proc rw - proc proc rw\n", "0::/\n")
    assert mgr.available() == {"memory_max": False, "cpu_quota": False, "tasks_max": False}
    assert mgr.create("web", ResourceLimits(nofile=10)) is None  # nothing for cgroups to do
    assert mgr.warnings == []
    assert mgr.create("web", ResourceLimits(memory_max=1 << 20, tasks_max=5)) is None
    assert mgr.warnings == [
        "daemon 'web': memory_max not applied: no writable memory controller "
        "(no cgroup v2 hierarchy; cgroup v1 memory not mounted)",
        "daemon 'web': tasks_max not applied: no writable pids controller "
        "(no cgroup v2 hierarchy; cgroup v1 pids not mounted)",
    ]


def test_read_only_mounts_are_reported(tmp_path: Path) -> None:
    (tmp_path / "mem").mkdir()
    (tmp_path / "v2").mkdir()
    mgr = _fake(
        tmp_path,
        f"30 25 0:26 / {tmp_path}/v2 ro,nosuid - cgroup2 cgroup2 ro\n"
        f"31 25 0:27 / {tmp_path}/mem ro,nosuid - cgroup cgroup ro,memory\n",
        "4:memory:/\n0::/\n",
    )
    assert mgr.available()["memory_max"] is False
    mgr.create("db", ResourceLimits(memory_max=1 << 20))
    assert mgr.warnings == [
        f"daemon 'db': memory_max not applied: no writable memory controller (cgroup v2 mounted "
        f"read-only at {tmp_path}/v2; cgroup v1 memory mounted read-only at {tmp_path}/mem)"
    ]


def test_v2_is_preferred_when_its_controllers_are_enabled(tmp_path: Path) -> None:
    base = tmp_path / "v2" / "ikosd.service"  # the mount shows /system.slice at v2/
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpu memory pids\n")
    (base / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (tmp_path / "cpu").mkdir()
    mgr = _fake(
        tmp_path,
        # A container's view: the v2 mount's root is a sub-cgroup of the host's.
        f"30 25 0:26 /system.slice {tmp_path}/v2 rw - cgroup2 cgroup2 rw\n"
        f"31 25 0:27 / {tmp_path}/cpu rw - cgroup cgroup rw,cpu,cpuacct\n",
        "1:cpu,cpuacct:/\n0::/system.slice/ikosd.service\n",
    )
    assert mgr.available() == {"memory_max": True, "cpu_quota": True, "tasks_max": True}
    assert mgr.describe()["memory_max"] == f"cgroup v2 at {tmp_path}/v2/ikosd.service"
    assert mgr.describe()["cpu_quota"] == f"cgroup v2 at {tmp_path}/v2/ikosd.service"


# -- this machine ----------------------------------------------------------------------------


@pytest.fixture
def cgroups() -> Iterator[CgroupManager]:
    mgr = CgroupManager(f"ikos-test-{uuid.uuid4().hex[:8]}")
    made: list[DaemonCgroup] = []
    original = mgr.create

    def create(daemon: str, limits: ResourceLimits, *, track: bool = False) -> DaemonCgroup | None:
        cg = original(daemon, limits, track=track)
        if cg is not None:
            made.append(cg)
        return cg

    mgr.create = create  # type: ignore[method-assign]
    try:
        yield mgr
    finally:
        for cg in made:
            cg.kill_all()
            cg.remove()
        mgr.cleanup()


def _require(mgr: CgroupManager, *limits: str) -> None:
    available = mgr.available()
    missing = [f"{lim}: {mgr.describe()[lim]}" for lim in limits if not available[lim]]
    if missing:
        pytest.skip("not writable on this machine: " + "; ".join(missing))


def _paths(tmp_path: Path) -> InstancePaths:
    p = InstancePaths.for_root(tmp_path / "inst")
    p.create()
    return p


def test_real_cgroup_with_limits_and_a_real_child(
    cgroups: CgroupManager, children: list[int], tmp_path: Path
) -> None:
    _require(cgroups, "memory_max", "tasks_max", "cpu_quota")
    limits = ResourceLimits(memory_max=64 << 20, tasks_max=16, cpu_quota=0.25)
    cg = cgroups.create("web", limits)
    assert cg is not None
    assert cgroups.warnings == []
    assert set(cg.applied) == {"memory_max", "tasks_max", "cpu_quota"}

    # The values, read back from the files the kernel exposes.
    def value(limit: str) -> dict[str, str]:
        out = {}
        for d in cg.dirs:
            for name in os.listdir(d):
                if name in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max",
                            "cpu.cfs_quota_us", "cpu.cfs_period_us"):  # fmt: skip
                    out[name] = Path(d, name).read_text().strip()
        return out

    files = value("all")
    assert files.get("memory.max", files.get("memory.limit_in_bytes")) == str(64 << 20)
    assert files["pids.max"] == "16"
    if "cpu.max" in files:
        assert files["cpu.max"] == "25000 100000"
    else:
        assert (files["cpu.cfs_quota_us"], files["cpu.cfs_period_us"]) == ("25000", "100000")

    # A real child joins before exec (ExecPlan.cgroup_procs).
    plan = build_exec_plan(
        Exec("web", "sleep", args=["30"], stdout="null", stderr="null"), _paths(tmp_path)
    )
    pid = spawn_exec(dataclasses.replace(plan, cgroup_procs=cg.procs_files))
    children.append(pid)
    proc_cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    for d in cg.dirs:
        rel = d.split(f"/{cgroups.instance}/")[1]
        assert f"/{cgroups.instance}/{rel}\n" in proc_cgroup, (d, proc_cgroup)
    assert cg.pids() == {pid}

    assert cg.kill_all()
    _, status = os.waitpid(pid, 0)
    children.remove(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert cg.remove()
    assert not any(os.path.exists(d) for d in cg.dirs)
    cgroups.cleanup()
    assert not any(os.path.exists(os.path.dirname(d)) for d in cg.dirs)


def test_tasks_max_is_enforced(cgroups: CgroupManager, children: list[int], tmp_path: Path) -> None:
    _require(cgroups, "tasks_max")
    cg = cgroups.create("forker", ResourceLimits(tasks_max=3))
    assert cg is not None
    out = tmp_path / "out"
    plan = build_exec_plan(
        Exec(
            "forker",
            "/bin/sh",
            args=["-c", "for i in 1 2 3 4 5 6; do sleep 30 & done; echo started; exec sleep 30"],
            stdout=f"file:{out}",
            stderr=f"file:{out}",
        ),
        _paths(tmp_path),
    )
    pid = spawn_exec(dataclasses.replace(plan, cgroup_procs=cg.procs_files))
    children.append(pid)
    # The fourth process cannot be forked: the shell says so (dash: "Cannot fork").
    wait_for(lambda: "fork" in out.read_text().lower())
    assert 1 <= len(cg.pids()) <= 3
    assert cg.kill_all()


def test_kill_all_reaches_processes_that_left_the_session(
    cgroups: CgroupManager, children: list[int], tmp_path: Path
) -> None:
    cg = cgroups.create("escaper", ResourceLimits(), track=True)
    if cg is None:
        _require(cgroups, "tasks_max")
        cg = cgroups.create("escaper", ResourceLimits(tasks_max=100))
    assert cg is not None
    plan = build_exec_plan(
        Exec(
            "escaper",
            "/bin/sh",
            args=["-c", "setsid sleep 30 & exec sleep 30"],
            stdout="null",
            stderr="null",
        ),
        _paths(tmp_path),
    )
    pid = spawn_exec(dataclasses.replace(plan, cgroup_procs=cg.procs_files))
    children.append(pid)

    def escaped_pid() -> int | None:
        for p in cg.pids():
            try:
                if p != pid and os.getsid(p) != os.getsid(pid):
                    return p
            except ProcessLookupError:
                pass
        return None

    escaped = wait_for(escaped_pid)
    assert cg.pids() == {pid, escaped}
    assert cg.kill_all(timeout=10)
    wait_for(lambda: not os.path.exists(f"/proc/{escaped}") or _zombie(escaped))
    assert cg.remove()


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_add_moves_an_existing_process(
    cgroups: CgroupManager, children: list[int], tmp_path: Path
) -> None:
    _require(cgroups, "tasks_max")
    cg = cgroups.create("adopted", ResourceLimits(tasks_max=10))
    assert cg is not None
    plan = build_exec_plan(
        Exec("adopted", "sleep", args=["30"], stdout="null", stderr="null"), _paths(tmp_path)
    )
    pid = spawn_exec(plan)
    children.append(pid)
    assert pid not in cg.pids()
    cg.add(pid)
    assert pid in cg.pids()
    assert not cg.remove()  # busy: kept, not an error
    assert cg.kill_all()
    assert cg.remove()


def test_a_daemons_directories_are_reused_until_removed_or_killed(
    cgroups: CgroupManager, children: list[int]
) -> None:
    cg = cgroups.create("again", ResourceLimits(), track=True)
    if cg is None:
        pytest.skip("no writable cgroup v2 to track in")
    inode = os.stat(cg.dirs[0]).st_ino
    assert cgroups.create("again", ResourceLimits(), track=True) is cg  # nothing made again
    assert cg.remove()
    fresh = cgroups.create("again", ResourceLimits(), track=True)
    assert fresh is not None and fresh is not cg and os.path.isdir(fresh.dirs[0])
    assert fresh.reusable and os.stat(fresh.dirs[0]).st_ino != inode
    # an empty cgroup is not written cgroup.kill; once it has been, it is not reused
    assert fresh.kill_all() and fresh.reusable
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "100016"])
    children.append(pid)
    fresh.add(pid)
    assert fresh.kill_all()
    os.waitpid(pid, 0)
    assert not fresh.reusable
    assert fresh.remove()


def test_a_directory_left_by_an_earlier_run_is_made_anew_or_not_reused(
    cgroups: CgroupManager, children: list[int]
) -> None:
    # A previous ikosd (crashed, or whose removal failed) may have written
    # cgroup.kill to a daemon's directory; Linux then kills at once every
    # process cloned into it. Nothing in cgroupfs says so: a new manager makes
    # an empty leftover anew, and does not count on a busy one.
    cg = cgroups.create("left", ResourceLimits(), track=True)
    if cg is None:
        pytest.skip("no writable cgroup v2 to track in")
    inode = os.stat(cg.dirs[0]).st_ino
    with open(os.path.join(cg.dirs[0], "cgroup.kill"), "w") as f:
        f.write("1")  # written behind the DaemonCgroup's back, as by an earlier ikosd
    later = CgroupManager(cgroups.instance)  # the next ikosd of the same instance
    fresh = later.create("left", ResourceLimits(), track=True)
    assert fresh is not None and fresh.dirs == cg.dirs
    assert fresh.reusable and os.stat(fresh.dirs[0]).st_ino != inode
    assert all(not found.reusable for found in later.existing().values())
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "100017"])
    children.append(pid)
    fresh.add(pid)
    busy = CgroupManager(cgroups.instance).create("left", ResourceLimits(), track=True)
    assert busy is not None and not busy.reusable  # kept (it holds a process), not trusted
    assert os.stat(busy.dirs[0]).st_ino == os.stat(fresh.dirs[0]).st_ino
    assert pid in busy.pids()
    assert fresh.kill_all()
    os.waitpid(pid, 0)
