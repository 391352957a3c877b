"""The spawn server (``ikos-cgexec serve``): starts into a cgroup, survives garbage, leaks nothing.

Each test drives a server from an event loop of its own, as ikosd does, with
a cgroup v2 directory made for the test; the daemons it starts are children
of the test process (CLONE_PARENT), reaped here.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from ikos.platform import _cgexec
from ikos.platform._cgroups import CgroupManager, DaemonCgroup
from ikos.platform._process import reap_orphans
from ikos.platform._spawn import ResourceLimits

CAN_TRACK = CgroupManager("ikos-probe").describe()["tracking"] != "none"
pytestmark = pytest.mark.skipif(not CAN_TRACK, reason="no writable cgroup v2 here")


@pytest.fixture
def helper() -> str:
    built = _cgexec.build()
    if built is None:
        pytest.skip("no C compiler to build the spawn helper")
    return built


@pytest.fixture
def cgroup() -> Iterator[DaemonCgroup]:
    manager = CgroupManager(f"ikos-test-server-{os.getpid()}")
    cg = manager.create("d", ResourceLimits(), track=True)
    assert cg is not None and cg.v2_only is not None
    yield cg
    cg.kill_all()
    manager.cleanup()


@contextlib.asynccontextmanager
async def serving(
    helper: str, cgroup: DaemonCgroup
) -> AsyncIterator[tuple[_cgexec.SpawnServer, int]]:
    """A spawn server, and /dev/null for its daemons' stdio; both closed after."""
    assert cgroup.v2_only is not None
    server = _cgexec.SpawnServer(helper)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield server, null
    finally:
        server.close()
        os.close(null)


def _fds(pid: int) -> set[int]:
    directory = f"/proc/{pid}/fd"
    listing = f"/proc/{os.getpid()}/fd"
    out = set()
    for n in os.listdir(directory):
        try:
            if os.readlink(f"{directory}/{n}") != listing:  # not listdir's own descriptor
                out.add(int(n))
        except FileNotFoundError:
            pass
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _reap(pid: int) -> int:
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def test_starts_into_the_cgroup_as_our_child_and_reports_a_failed_exec(
    helper: str, cgroup: DaemonCgroup, tmp_path: Path
) -> None:
    async def main() -> None:
        async with serving(helper, cgroup) as (server, null):
            out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                before = _fds(os.getpid())
                pid, error = await server.spawn(
                    cgroup.v2_only,
                    "/bin/sh",
                    ["sh", "-c", "echo $IKOS_T; exec sleep 100008"],
                    {"IKOS_T": "hello"},
                    [null, out, out],
                )
                assert error == "" and pid is not None
                assert cgroup.pids() == {pid}  # in its cgroup, and ours to wait for
                assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(
                    os.getpid()
                )
                assert os.getsid(pid) == pid
                wait_for(lambda: (tmp_path / "out").read_text() == "hello\n", message="its stdout")
                # only its stdio: nor the server's socket nor the cgroup directory leaked in
                wait_for(lambda: _fds(pid) == {0, 1, 2}, message="the daemon's descriptors")
                # the server's own: its stdio, its socket, its epoll (for armed restarts)
                assert server.pid is not None and _fds(server.pid) == {0, 1, 2, 3, 4}
                assert _fds(os.getpid()) - before == {server._sock.fileno()}  # type: ignore[union-attr]
                _reap(pid)

                missing = str(tmp_path / "missing")
                pid, error = await server.spawn(cgroup.v2_only, missing, ["x"], {}, [null] * 3)
                assert error == f"executable: No such file or directory: {missing}"
                assert pid is not None and os.waitpid(pid, 0)[1] >> 8 == 127
                assert server.usable
            finally:
                os.close(out)

    asyncio.run(main())


def test_survives_garbage_and_exits_when_the_manager_is_gone(
    helper: str, cgroup: DaemonCgroup
) -> None:
    async def main() -> None:
        async with serving(helper, cgroup) as (server, null):
            pid, _ = await server.spawn(
                cgroup.v2_only, "/bin/sleep", ["sleep", "100009"], {}, [null] * 3
            )
            assert pid is not None
            _reap(pid)
            sock = server._sock
            assert sock is not None and server.pid is not None
            fds = _fds(server.pid)
            loop = asyncio.get_running_loop()
            loop.remove_reader(sock.fileno())  # read the replies here
            sock.setblocking(True)
            garbage = [
                (b"no descriptors\0", []),
                (b"1\0/bin/true\0", [null] * 4 + [null]),  # five descriptors, argv short
                (b"x" * 100, [null] * 4),  # not NUL-terminated
                (b"-3\0/bin/true\0a\0", [null] * 4),
            ]
            for payload, passed in garbage:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", passed))]
                sock.sendmsg([payload], rights if passed else [])
                assert sock.recv(8192).startswith(b"request: malformed"), payload
            assert _fds(server.pid) == fds  # what came with the garbage was closed
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), server._readable)
            pid, error = await server.spawn(
                cgroup.v2_only, "/bin/sleep", ["sleep", "100010"], {}, [null] * 3
            )
            assert error == "" and pid is not None  # and it still serves
            _reap(pid)

            # ikosd's death is its end of the socket closing: the server exits
            spid = server.pid
            loop.remove_reader(sock.fileno())
            sock.close()
            server._sock = None
            wait_for(lambda: _gone(spid), message="the server to exit at EOF")
            assert os.waitpid(spid, 0)[1] == 0
            server.pid = None

    asyncio.run(main())


def test_a_cancelled_start_leaves_nothing_and_a_dead_server_is_not_used(
    helper: str, cgroup: DaemonCgroup
) -> None:
    async def main() -> None:
        async with serving(helper, cgroup) as (server, null):
            start = asyncio.ensure_future(
                server.spawn(cgroup.v2_only, "/bin/sleep", ["sleep", "100011"], {}, [null] * 3)
            )
            await asyncio.sleep(0)  # sent, not answered yet
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
            for _ in range(1000):  # the reply kills and reaps what was started
                if not cgroup.pids():
                    break
                await asyncio.sleep(0.01)
            assert cgroup.pids() == set()

            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            for _ in range(1000):
                if not server.usable:
                    break
                await asyncio.sleep(0.01)
            assert not server.usable and server.pid is None  # reaped
            with pytest.raises(OSError):
                await server.spawn(cgroup.v2_only, "/bin/true", ["true"], {}, [null] * 3)

    asyncio.run(main())


def test_a_daemon_dead_before_its_reply_is_not_reaped_as_an_orphan(
    helper: str, cgroup: DaemonCgroup
) -> None:
    async def main() -> None:
        async with serving(helper, cgroup) as (server, null):
            try:
                await server.spawn(
                    cgroup.v2_only, "/bin/sleep", ["sleep", "100012"], {}, [null] * 3
                )
                start = asyncio.ensure_future(
                    server.spawn(cgroup.v2_only, "/bin/sh", ["sh", "-c", "exit 7"], {}, [null] * 3)
                )
                await asyncio.sleep(0)  # sent; the reply is not read until the loop runs again
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)  # the daemon is a zombie
                assert info is not None and info.si_status == 7
                assert reap_orphans() == ([], True)  # held: come back later
                pid, error = await start
                assert error == "" and pid == info.si_pid
                assert os.waitpid(pid, 0)[1] >> 8 == 7  # its status is still its handle's
            finally:
                for pid in cgroup.pids():
                    _reap(pid)

    asyncio.run(main())


def test_a_wave_larger_than_the_socket_buffer_is_pipelined(
    helper: str, cgroup: DaemonCgroup
) -> None:
    async def main() -> None:
        async with serving(helper, cgroup) as (server, null):
            env = {"IKOS_PAD": "x" * 8192}  # 200 requests: ~1.6 MB, several socket buffers
            try:
                results = await asyncio.gather(
                    *(
                        server.spawn(
                            cgroup.v2_only, "/bin/sleep", ["sleep", "100013"], env, [null] * 3
                        )
                        for _ in range(200)
                    )
                )
                pids = [pid for pid, error in results if pid is not None and not error]
                assert len(set(pids)) == 200 and server.usable
                assert cgroup.pids() == set(pids)
            finally:
                for pid in cgroup.pids():
                    _reap(pid)

    asyncio.run(main())


def _servers(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
                if comm.startswith("ikos-cgexec") and rest.split()[1] == str(parent):
                    out.append(int(entry))
    return out


def test_ikosd_crashing_ends_its_server_and_the_next_ikosd_adopts_the_daemon(
    ikosd_factory: Any, helper: str
) -> None:
    tree = """
import ikos
tree = ikos.Supervisor("root", children=[ikos.Exec("d", "/bin/sleep", args=["100015"])])
"""
    inst = ikosd_factory(tree=tree)
    st = inst.wait_state("d", "running")
    assert st["started_by"] == "cgexec-server"
    (server,) = _servers(inst.pid)
    inst.crash()
    wait_for(lambda: _gone(server), message="the spawn server to exit with ikosd")
    again = ikosd_factory(tree=tree)  # the same root: adopts the daemon, stops it at the end
    assert again.wait_state("d", "running")["pid"] == st["pid"]
