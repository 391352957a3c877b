"""Resource sampling against processes whose usage is known, through the real ikosd.

An actor that holds 64 MiB, an executable that burns CPU, one that holds a
known number of open files, one with a child process: each must show in
``ikosctl status --json`` (the ``usage`` object), in ``/metrics`` and in
``ikosctl top``; a stopped daemon's series go. The sampler's own logic
(CPU seconds kept across exited children, vanished processes skipped) is
tested directly on processes this test starts.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import termios
import urllib.request
import uuid
from typing import Any

import psutil
import pytest
from conftest import HANG, IKOSCTL, Instance, alive, wait_for
from test_local_users import ctl_as, reachable, stranger  # noqa: F401 (fixtures)

from ikos._errors import ConfigError
from ikos.manager._config import MonitorSettings, load_config, read_monitor_settings
from ikos.monitor._sampler import Sampler, Target
from ikos.platform._cgroups import CgroupManager, ResourceLimits

MIB = 1024 * 1024
FDS = 40
PY = sys.executable

TREE = f"""
import ikos


class Hog(ikos.Actor):
    def on_start(self):
        # touched page by page, so that every page is resident and the process's own
        self.block = bytearray(64 * {MIB})
        for i in range(0, len(self.block), 4096):
            self.block[i] = 1

    def receive(self, message):
        return len(self.block)


tree = ikos.Supervisor(
    "root",
    max_restarts=50,
    within=60.0,
    children=[
        ikos.Child("hog", Hog),
        ikos.Exec("burner", {PY!r}, args=["-c", "while True: pass"]),
        ikos.Exec(
            "files",
            {PY!r},
            args=["-c", "import os, time; fds = [os.open('/dev/null', os.O_RDONLY) "
                  "for _ in range({FDS})]; time.sleep(3600)"],
        ),
        ikos.Exec(
            "parent",
            "/bin/sh",
            args=["-c", "sleep 3600 & sleep 3600 & wait"],
        ),
    ],
)
"""

CONFIG = """
[ikosd]
metrics = "127.0.0.1:0"

[monitor]
interval = 0.2
"""


@pytest.fixture
def inst(ikosd_factory: Any) -> Any:
    instance = ikosd_factory(tree=TREE, config=CONFIG)
    for name in ("hog", "burner", "files", "parent"):
        instance.wait_state(name, "running", timeout=HANG)
    return instance


def usage_of(inst: Any, name: str, check: Any) -> dict[str, Any]:
    """The usage object of ``name`` once ``check(usage)`` holds."""

    def ready() -> dict[str, Any] | None:
        usage = inst.status(name).get("usage")
        return usage if usage is not None and check(usage) else None

    return wait_for(ready, HANG, message=f"the usage of {name} to satisfy the check")  # type: ignore[no-any-return]


def metrics_url(inst: Any) -> str:
    found = re.search(r"metrics (http://\S+/metrics)", inst.log_text())
    assert found, inst.log_text()
    return found.group(1)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=HANG) as answer:
        return str(answer.read().decode())


def test_known_usage_shows_in_status(inst: Any) -> None:
    # Polled on USS, not RSS: the actor's RSS also counts the pages it shares with
    # the fork server's preloaded image (tens of MiB), so it passes 64 MiB while
    # on_start is still touching its block; its own pages reach 64 MiB only once done.
    hog = usage_of(inst, "hog", lambda u: u["uss_bytes"] >= 64 * MIB)
    assert hog["rss_bytes"] >= hog["uss_bytes"]  # its own pages, and what it shares
    assert hog["processes"] >= 1 and hog["threads"] >= 1
    assert set(hog) == {
        "cpu_seconds",
        "cpu_percent",
        "rss_bytes",
        "uss_bytes",
        "open_fds",
        "threads",
        "io_read_bytes",
        "io_write_bytes",
        "processes",
        "sampled_at",
    }
    first = usage_of(inst, "burner", lambda u: u["cpu_seconds"] > 0)["cpu_seconds"]
    later = usage_of(inst, "burner", lambda u: u["cpu_seconds"] >= first + 0.5)
    assert later["cpu_percent"] is not None and later["cpu_percent"] > 0
    usage_of(inst, "files", lambda u: u["open_fds"] >= FDS)
    # the shell and its two sleeps: the session's processes count, not only the main one
    usage_of(inst, "parent", lambda u: u["processes"] == 3)
    text = inst.ctl("status", "hog").stdout
    assert re.search(r"Memory: \d+\.\dM resident, \d+\.\dM unique", text), text
    assert "CPU: " in text and "Tasks: " in text


def test_a_daemon_is_sampled_soon_after_it_starts_not_at_the_next_interval(
    ikosd_factory: Any,
) -> None:
    # An interval of an hour: only the pass a start schedules can sample them.
    inst = ikosd_factory(tree=TREE, config=CONFIG.replace("interval = 0.2", "interval = 3600"))
    inst.wait_state("hog", "running", timeout=HANG)
    first = usage_of(inst, "hog", lambda u: u["rss_bytes"] >= 64 * MIB)
    text = inst.ctl("status", "hog").stdout
    assert re.search(r"Tasks: 1 process, 1 thread, \d+ open files", text), text
    inst.ctl("restart", "hog", check=True)
    pid = inst.status("hog")["pid"]
    again = usage_of(inst, "hog", lambda u: u["sampled_at"] > first["sampled_at"])
    assert inst.status("hog")["pid"] == pid and again["rss_bytes"] >= 64 * MIB


def test_usage_metrics_and_stopped_daemons_leave(inst: Any) -> None:
    url = metrics_url(inst)
    text = wait_for(
        lambda: 'ikos_daemon_open_fds{daemon="files"}' in (t := scrape(url)) and t,
        HANG,
        message="the files daemon's series",
    )
    for series in (
        'ikos_daemon_cpu_seconds_total{daemon="burner"}',
        'ikos_daemon_memory_bytes{daemon="hog",kind="rss"}',
        'ikos_daemon_memory_bytes{daemon="hog",kind="uss"}',
        'ikos_daemon_threads{daemon="hog"}',
        'ikos_daemon_processes{daemon="parent"}',
        "ikos_manager_process_resident_memory_bytes",
    ):
        assert series in text, series
    hog = re.search(r'ikos_daemon_memory_bytes\{daemon="hog",kind="rss"\} (\S+)', text)
    assert hog is not None and float(hog.group(1)) >= 64 * MIB
    inst.ctl("stop", "burner", check=True)
    wait_for(
        lambda: 'daemon="burner"}' not in scrape(url).replace("ikos_daemon_up", "#"),
        HANG,
        message="the stopped daemon's usage series to go",
    )
    after = scrape(url)
    assert not re.search(
        r'ikos_daemon_(cpu|memory|open_fds|threads|processes)\S*\{daemon="burner"', after
    )
    assert 'ikos_daemon_open_fds{daemon="files"}' in after
    assert "usage" not in inst.status("burner")


def test_top_json_and_table(inst: Any) -> None:
    usage_of(inst, "hog", lambda u: u["rss_bytes"] >= 64 * MIB)

    def top() -> list[dict[str, Any]]:
        res = inst.ctl("top", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    def all_sampled() -> list[dict[str, Any]] | None:
        rows = top()
        # the IPC broker, not used here, waits for its first connection: nothing to sample
        return rows if all(r["usage"] for r in rows if r["state"] == "running") else None

    rows = wait_for(
        all_sampled,
        HANG,
        message="every daemon's usage in top",
    )
    names = [r["name"] for r in rows]
    assert {"hog", "burner", "files", "parent"} <= set(names)
    for row in rows:
        assert {"name", "kind", "state", "pid", "restarts", "usage"} <= set(row)
        assert row["kind"] != "supervisor"
    # sorted by CPU (the default): the burner first, once the others' start-up is
    # out of the last interval
    for sort, first in (("cpu", "burner"), ("memory", "hog")):
        wait_for(
            lambda sort=sort, first=first: (
                json.loads(inst.ctl("top", "--json", "--sort", sort).stdout)[0]["name"] == first
            ),
            HANG,
            message=f"{first} first by {sort}",
        )
    names_sorted = [
        r["name"] for r in json.loads(inst.ctl("top", "--json", "--sort", "name").stdout)
    ]
    assert names_sorted == sorted(names_sorted)
    # not a terminal: one snapshot, tab-separated rows, no header
    plain = inst.ctl("top")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert lines and all(len(line.split("\t")) == 11 for line in lines)
    assert inst.ctl("top", "--sort", "colour").returncode == 1


# --- the sampler and the [monitor] table alone -------------------------------------------


def test_cpu_of_exited_children_is_kept_and_vanished_processes_skipped(tmp_path: Any) -> None:
    script = (
        "import os, subprocess, sys, time\n"
        "os.setsid()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time\\n"
        "end = time.process_time() + 0.5\\nwhile time.process_time() < end: pass\\n"
        "import sys; sys.stdin.read()'], stdin=subprocess.PIPE)\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.readline()\n"
        "child.stdin.close(); child.wait()\n"
        "print('done', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    with subprocess.Popen(
        [PY, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            child = int(proc.stdout.readline())
            sampler = Sampler()
            target = Target("x", proc.pid)
            seen = wait_for(
                lambda: (u := sampler.sample([target])["x"]).cpu_seconds >= 0.5 and u,
                HANG,
                message="the child's CPU",
            )
            assert seen.processes == 2
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "done"
            assert not alive(child)
            after = sampler.sample([target])["x"]
            assert after.processes == 1  # the child is gone, its CPU seconds are not
            assert after.cpu_seconds >= seen.cpu_seconds
        finally:
            proc.kill()
            proc.wait()
    # a process that is gone is left out, not an error
    assert Sampler().sample([Target("gone", proc.pid)]) == {}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[monitor]\ninterval = 0\n", "[monitor] key 'interval': expected seconds > 0"),
        ("[monitor]\ninterval = 0.01\n", "expected seconds >= 0.1"),
        ("[monitor]\ninterval = 'often'\n", "key 'interval'"),
        ("[monitor]\nuss = 'yes'\n", "key 'uss': expected true or false"),
        ("[monitor]\nuss_every = 0\n", "key 'uss_every': expected an integer >= 1"),
        ("monitor = 5\n", "expected a table [monitor]"),
    ],
)
def test_bad_monitor_table_is_an_error_naming_it(tmp_path: Any, table: str, message: str) -> None:
    path = tmp_path / "ikos.toml"
    path.write_text(table + '[executables.a]\nexecutable = "/bin/true"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value), str(info.value)


def test_monitor_table_read_with_warnings(tmp_path: Any) -> None:
    path = tmp_path / "ikos.toml"
    path.write_text("[monitor]\ninterval = 2\nuss = false\nuss_every = 3\nintervall = 3\n")
    settings, warnings = read_monitor_settings(path)
    assert settings == MonitorSettings(interval=2.0, uss=False, uss_every=3)
    assert len(warnings) == 1 and "did you mean 'interval'" in warnings[0]
    assert read_monitor_settings(None) == (MonitorSettings(), ())


def test_ikosd_refuses_a_bad_monitor_table(ikosd_factory: Any) -> None:
    inst = ikosd_factory(
        config="[ikosd]\nmetrics = false\n[monitor]\ninterval = -1\n",
        wait_ready=False,
        expect_exit=2,
    )
    assert inst.proc.wait(timeout=60) == 2
    assert "[monitor] key 'interval'" in inst.log_text()


def test_uss_is_read_every_nth_pass_and_kept_between() -> None:
    with subprocess.Popen(
        [PY, "-c", "import time; time.sleep(3600)"], start_new_session=True
    ) as proc:
        try:
            sampler = Sampler(uss=True, uss_every=3)
            target = Target("x", proc.pid)
            passes = [sampler.sample([target])["x"] for _ in range(4)]
            assert all(p.uss_bytes is not None and p.uss_bytes > 0 for p in passes)
            assert passes[0].uss_bytes == passes[1].uss_bytes == passes[2].uss_bytes
            assert Sampler(uss=False).sample([target])["x"].uss_bytes is None
        finally:
            proc.kill()
            proc.wait()


def test_a_daemon_that_moves_to_another_cgroup_is_followed() -> None:
    # The sampler remembers a daemon's cgroup for its run instead of reading
    # /proc/PID/cgroup every pass; a daemon that moves itself elsewhere must not
    # keep being counted by its old cgroup's members.
    cgroups = CgroupManager(f"ikos-test-{uuid.uuid4().hex[:8]}")
    made = [cgroups.create(name, ResourceLimits(), track=True) for name in ("a", "b")]
    if None in made:
        cgroups.cleanup()
        pytest.skip("cgroup v2 is not writable here: " + "; ".join(cgroups.warnings))
    a, b = (cg for cg in made if cg is not None)
    sleep = [PY, "-c", "import time; time.sleep(3600)"]
    procs = [subprocess.Popen(sleep, start_new_session=True) for _ in range(3)]
    try:
        main, buddy, other = procs
        for proc, cg in ((main, a), (buddy, a), (other, b)):
            cg.add(proc.pid)
        sampler = Sampler(uss=False)
        assert sampler.sample([Target("x", main.pid)])["x"].processes == 2
        assert sampler.sample([Target("x", main.pid)])["x"].processes == 2
        b.add(main.pid)  # the daemon moves itself into b, next to `other`
        usage = sampler.sample([Target("x", main.pid)])["x"]
        assert usage.processes == 2 and usage.pid == main.pid
        buddy.kill()
        buddy.wait()
        assert sampler.sample([Target("x", main.pid)])["x"].processes == 2  # b's, not a's
        other.kill()
        other.wait()
        assert sampler.sample([Target("x", main.pid)])["x"].processes == 1
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for cg in (a, b):
            cg.kill_all()
            cg.remove()
        cgroups.cleanup()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None,
    reason="needs root, useradd and setpriv to create another user and act as it",
)
def test_another_user_sees_no_usage(
    ikosd_factory: Any,
    reachable: Any,  # noqa: F811 (the fixture imported above)
    stranger: Any,  # noqa: F811
) -> None:
    root = reachable / "root"
    started = ikosd_factory(tree=TREE, config=CONFIG, args=["--root", str(root)])
    inst = Instance(root, started.proc, started.mark, started.log)
    usage_of(inst, "hog", lambda u: u["rss_bytes"] >= 64 * MIB)
    res = ctl_as(stranger, inst, "top", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert {"hog", "burner"} <= {r["name"] for r in rows}
    assert all(r["usage"] is None and r["state"] for r in rows)
    res = ctl_as(stranger, inst, "status", "hog", "--json")
    assert res.returncode == 0, res.stderr
    assert "usage" not in json.loads(res.stdout)[0]


def test_top_on_a_terminal_refreshes_sorts_and_restores_it(inst: Any) -> None:
    usage_of(inst, "burner", lambda u: u["cpu_percent"] is not None)
    primary, secondary = pty.openpty()
    before = termios.tcgetattr(secondary)
    proc = subprocess.Popen(
        [IKOSCTL, "--root", str(inst.root), "top", "--interval", "0.2"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**inst.env, "COLUMNS": "200", "LINES": "50"},
    )
    seen = bytearray()

    def output_has(text: bytes) -> bool:
        while select.select([primary], [], [], 0.05)[0]:
            try:
                seen.extend(os.read(primary, 65536))
            except OSError:
                break
        return text in seen

    try:
        wait_for(lambda: output_has(b"sorted by cpu"), HANG, message="the first frame")
        assert b"burner" in seen and b"CPU%" in seen
        os.write(primary, b"n")
        wait_for(lambda: output_has(b"sorted by name"), HANG, message="the sort key")
        os.write(primary, b"q")
        assert proc.wait(timeout=HANG) == 0
        output_has(b"")
        assert seen.endswith(b"\x1b[?25h\x1b[?1049l"), bytes(seen[-40:])
        assert termios.tcgetattr(secondary) == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
        os.close(secondary)


def test_figures_read_from_proc_agree_with_psutil() -> None:
    # the sampler reads /proc itself (stat, the size of fd/, io, smaps_rollup): each
    # figure must be what psutil reads for the same process, a quiet one with known fds
    script = (
        "import os, sys, threading, time\n"
        "fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(17)]\n"
        "for _ in range(3):\n"
        "    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
        "with open('/proc/self/exe', 'rb') as f: f.read(1 << 20)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    with subprocess.Popen(
        [PY, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "ready"
            usage = Sampler(uss=True).sample([Target("x", proc.pid)])["x"]
            p = psutil.Process(proc.pid)
            times, memory, io = p.cpu_times(), p.memory_full_info(), p.io_counters()
            assert usage.processes == 1
            assert usage.open_fds == p.num_fds() >= 17 + 3
            assert usage.threads == p.num_threads() == 4
            assert usage.io_read_bytes == io.read_bytes
            assert usage.io_write_bytes == io.write_bytes
            assert abs(usage.cpu_seconds - (times.user + times.system)) < 0.05
            assert abs(usage.rss_bytes - memory.rss) < 256 * 1024
            assert usage.uss_bytes is not None
            assert abs(usage.uss_bytes - memory.uss) < 256 * 1024
        finally:
            proc.kill()
            proc.wait()


def test_a_daemon_s_passes_keep_one_key_for_its_run() -> None:
    # Each pass read the main process's key (pid, start time) anew: the run's record,
    # its CPU figures and the USS cache each held a tuple and a float of their own.
    with subprocess.Popen(["/bin/sleep", "60"], start_new_session=True) as proc:
        try:
            sampler = Sampler()
            target = Target("x", proc.pid)
            for _ in range(3):
                assert sampler.sample([target])["x"].pid == proc.pid
            run = sampler._runs["x"]
            assert next(k for k, _ in run.cpu if k == run.key) is run.key
            assert next(k for k in sampler._uss if k == run.key) is run.key
        finally:
            proc.kill()


def test_an_exit_s_description_is_one_string_per_kind_of_end() -> None:
    from ikos.platform._process import ExitStatus

    a, b = ExitStatus(None, 15, 1.0), ExitStatus(None, 15, 2.0)
    assert a.describe() == "killed by SIGTERM" and a.describe() is b.describe()
    assert ExitStatus(3, None, 0).describe() == "exited with status 3"
    assert ExitStatus(0, None, 0).describe() == "exited normally"
    assert ExitStatus(None, None, 0).describe() == "exited (status unknown)"
    assert ExitStatus(None, 99, 0).describe() == "killed by signal 99"


def test_a_step_of_the_wall_clock_between_passes_is_not_a_cpu_figure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CPU percentage divides the CPU seconds between two passes by the time
    # between them: by the wall clock, a step of 14 s forward made a busy
    # daemon look nearly idle, and a step backward made it None.
    import time

    script = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"
    with subprocess.Popen([PY, "-c", script], start_new_session=True) as proc:
        try:
            sampler = Sampler()
            target = Target("x", proc.pid)
            before, at = sampler.sample([target])["x"].cpu_seconds, time.monotonic()
            now = time.time
            for step in (14.0, -28.0):
                monkeypatch.setattr(time, "time", lambda s=step, now=now: now() + s)
                now = time.time
                # until the burner has added CPU time (however loaded the machine)
                wait_for(
                    lambda b=before: (
                        (u := Sampler().sample([target]).get("x")) and u.cpu_seconds > b
                    ),
                    HANG,
                    message="the burner's CPU time",
                )
                usage = sampler.sample([target])["x"]
                elapsed, at = time.monotonic() - at, time.monotonic()
                used, before = usage.cpu_seconds - before, usage.cpu_seconds
                assert used > 0
                # the figure is this pass's CPU over the time between the passes; by the
                # wall clock it was diluted by the 14 s (under an eighth of it), or None
                expected = 100.0 * used / elapsed
                assert usage.cpu_percent is not None, step
                assert usage.cpu_percent > 0.5 * expected, (step, usage.cpu_percent, expected)
        finally:
            proc.kill()


def test_the_sampler_stops_even_when_woken_in_the_turn_it_is_cancelled() -> None:
    # Python 3.11's asyncio.wait_for returns its awaitable's result and drops a
    # cancellation that arrives in the same turn as that result: a daemon's start
    # woke the sampler ("soon") as ikosd stopped it, the loop went on, and ikosd
    # hung after stopping its tree ("stopping the sampler extension").
    import asyncio

    from ikos.manager._sampler_service import SamplerService

    async def scenario() -> int:
        service = SamplerService()
        passes = 0

        async def sample_once() -> None:
            nonlocal passes
            passes += 1

        service.sample_once = sample_once  # type: ignore[method-assign]
        service._task = asyncio.get_running_loop().create_task(service._run())
        while passes == 0:
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)  # the loop waits for its wake-up
        task = service._task
        service._wake.set()  # the wake-up and the stop's cancellation in one turn
        stopping = asyncio.ensure_future(service.stop())
        done, _ = await asyncio.wait((stopping,), timeout=3)
        assert done and task.done(), "the sampler's loop went on after its stop"
        return passes

    assert asyncio.run(scenario()) >= 1
