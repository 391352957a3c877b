"""A unit's life around its main process, under the real ikosd.

What systemd does beyond starting and stopping the main process, and ikos
now does the same way: the unit's commands (ExecStartPre=, ExecReload=,
ExecStopPost=...) run in the daemon's cgroup, so what they leave running
is stopped with the daemon; ExecStopPost= runs after every end (a stop, a
crash, a failed start) with ``$SERVICE_RESULT``, ``$EXIT_CODE`` and
``$EXIT_STATUS``, before a restart; StartLimitBurst= within
StartLimitIntervalSec= stops the restarts of a unit that keeps crashing.
The parsing side of these directives is in ``tests/test_units.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

import ikos
from ikos._errors import ConfigError, SpawnError
from ikos.platform._paths import InstancePaths
from ikos.platform._spawn import build_exec_plan
from ikos.platform._unit import load_unit, stop_post_environment


def write_unit(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def service_writing_to(directory: Path, name: str, body: str) -> tuple[Path, Path]:
    """A directory ``out`` and the unit ``NAME.service`` whose [Service] is ``body``
    with ``{out}`` replaced by it."""
    out = directory / "out"
    out.mkdir(exist_ok=True)
    text = "[Service]\n" + textwrap.dedent(body).lstrip().replace("{out}", str(out))
    return out, write_unit(directory, f"{name}.service", text)


def run_units(ikosd_factory: Any, units: dict[str, Path]) -> Any:
    tables = "".join(f'[executables.{name}]\nunit = "{path}"\n\n' for name, path in units.items())
    config = "[root]\nmax_restarts = 50\nwithin = 60\n\n" + tables
    return ikosd_factory(config=config, args=["--metrics", "off"])


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie is dead: the leftovers' parent is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line for line in f.read().splitlines() if line.startswith("0::"))


def read_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text().strip(), 20, message=str(path)))


# -- the commands in the daemon's cgroup -----------------------------------------------------


def test_what_the_commands_leave_running_is_the_daemons(ikosd_factory: Any, tmp_path: Path) -> None:
    out, unit = service_writing_to(
        tmp_path,
        "leaves",
        """
        ExecStartPre=/bin/sh -c 'sleep 1001 & echo $! > {out}/pre.$$$$'
        ExecStart=/bin/sleep 1000
        ExecReload=/bin/sh -c 'sleep 1002 & echo $! > {out}/reload'
        Restart=always
        RestartSec=0
        """,
    )
    inst = run_units(ikosd_factory, {"leaves": unit})
    pid = inst.wait_state("leaves", "running", timeout=30)["pid"]
    [pre_file] = out.glob("pre.*")
    pre = read_pid(pre_file)
    pre_file.unlink()
    inst.ctl("reload", "leaves", check=True)
    reloaded = read_pid(out / "reload")
    # in the daemon's cgroup, as systemd runs a unit's commands in the unit's cgroup
    assert alive(pre) and alive(reloaded)
    assert cgroup_of(pre) == cgroup_of(reloaded) == cgroup_of(pid)
    assert cgroup_of(pid) != cgroup_of(os.getpid())

    # the main process's end is still seen at once, and ends what the commands left
    os.kill(pid, signal.SIGKILL)
    new = inst.wait_running_new_pid("leaves", pid, timeout=30)
    wait_for(lambda: not alive(pre) and not alive(reloaded), 20, message="leftovers killed")
    [pre_file] = wait_for(lambda: list(out.glob("pre.*")), 20, message="ExecStartPre= again")
    second = read_pid(pre_file)
    assert alive(second) and cgroup_of(second) == cgroup_of(new)

    inst.ctl("stop", "leaves", check=True)
    inst.wait_state("leaves", "stopped")
    wait_for(lambda: not alive(second), 20, message="the stop to kill ExecStartPre='s leftover")
    inst.ctl("start", "leaves", check=True)  # the directory of a killed cgroup is not reused
    third = inst.wait_running_new_pid("leaves", new, timeout=30)
    assert alive(third)


def test_a_start_cut_short_by_ikosd_stopping_leaves_nothing(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    out, unit = service_writing_to(
        tmp_path,
        "stuck",
        """
        ExecStartPre=/bin/sh -c 'setsid sleep 1005 & echo $! > {out}/pre; exec sleep 1000'
        ExecStart=/bin/sleep 1000
        """,
    )
    config = f'[executables.stuck]\nunit = "{unit}"\n'
    inst = ikosd_factory(config=config, args=["--metrics", "off"], wait_ready=False)
    pre = read_pid(out / "pre")  # ikosd is not ready: its tree waits for this start
    assert alive(pre)
    assert inst.terminate() == 0
    wait_for(lambda: not alive(pre), 20, message="ExecStartPre='s leftover killed")


def test_process_group_mode_keeps_the_commands_apart(ikosd_factory: Any, tmp_path: Path) -> None:
    out, unit = service_writing_to(
        tmp_path,
        "apart",
        """
        KillMode=process
        ExecStartPre=/bin/sh -c 'sleep 1004 & echo $! > {out}/pre'
        ExecStart=/bin/sleep 1000
        """,
    )
    inst = run_units(ikosd_factory, {"apart": unit})
    inst.wait_state("apart", "running", timeout=30)
    pre = read_pid(out / "pre")
    try:
        inst.ctl("stop", "apart", check=True)
        inst.wait_state("apart", "stopped")
        assert alive(pre)  # KillMode=process: only the daemon's own session is stopped
    finally:
        os.kill(pre, signal.SIGKILL)


# -- ExecStopPost= ---------------------------------------------------------------------------

REPORT = "/bin/sh -c 'echo \"$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS\" >> {out}/{name}'"


def post_unit(directory: Path, out: Path, name: str, body: str) -> Path:
    report = REPORT.format(out=out, name=name)
    return write_unit(
        directory, f"{name}.service", f"[Service]\n{textwrap.dedent(body)}ExecStopPost={report}\n"
    )


def lines(path: Path, count: int) -> list[str]:
    def enough() -> list[str] | None:
        got = path.read_text().splitlines() if path.exists() else []
        return got if len(got) >= count else None

    return wait_for(enough, 30, message=f"{count} lines in {path}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def post_units(tmp_path_factory: Any) -> tuple[Path, dict[str, Path]]:
    base = tmp_path_factory.mktemp("stop-post")
    out = base / "out"
    out.mkdir()
    units = {
        # a crash, then a stop; the first ExecStopPost= fails ('-'), the others still run
        "crashes": post_unit(
            base,
            out,
            "crashes",
            f"""\
            ExecStart=/bin/sleep 1000
            Restart=always
            ExecStopPost=-/bin/false
            ExecStopPost=/bin/sh -c 'sleep 1003 & echo $! > {out}/post-leftover'
            """,
        ),
        "exits": post_unit(base, out, "exits", "ExecStart=/bin/sh -c 'exit 3'\n"),
        "prefails": post_unit(
            base, out, "prefails", "ExecStartPre=/bin/false\nExecStart=/bin/sleep 1000\n"
        ),
        # TimeoutStopSec= bounds each ExecStopPost=: the next one runs, the stop ends
        "slowpost": post_unit(
            base,
            out,
            "slowpost",
            """\
            ExecStart=/bin/sleep 1000
            TimeoutStopSec=1
            ExecStopPost=/bin/sleep 1000
            """,
        ),
    }
    return out, units


def test_stop_post_after_a_crash_and_a_stop(ikosd_factory: Any, post_units: Any) -> None:
    out, units = post_units
    inst = run_units(ikosd_factory, units)
    pid = inst.wait_state("crashes", "running", timeout=30)["pid"]
    os.kill(pid, signal.SIGKILL)
    # ExecStopPost= ran before the restart: its line is there when the new run is
    new = inst.wait_running_new_pid("crashes", pid, timeout=30)
    assert (out / "crashes").read_text().splitlines() == ["signal killed KILL"]
    leftover = read_pid(out / "post-leftover")
    wait_for(lambda: not alive(leftover), 20, message="ExecStopPost='s leftover killed")
    inst.ctl("stop", "crashes", check=True)
    inst.wait_state("crashes", "stopped")
    assert lines(out / "crashes", 2)[1] == "success killed TERM"
    assert inst.status("crashes")["pid"] in (None, new)

    # an exit with a status; a start whose ExecStartPre= failed (no main process)
    assert lines(out / "exits", 1)[0] == "exit-code exited 3"
    assert lines(out / "prefails", 1)[0].strip() == "exit-code"
    assert inst.status("prefails")["state"] != "running"

    # a stop-post command that outlives TimeoutStopSec= is killed; the stop completes
    inst.wait_state("slowpost", "running", timeout=30)
    inst.ctl("stop", "slowpost", check=True)
    inst.wait_state("slowpost", "stopped", timeout=30)
    assert lines(out / "slowpost", 1)[0] == "success killed TERM"
    assert "exec_stop_post" in inst.log_text() and "timed out after 1 s" in inst.log_text()


@pytest.mark.parametrize(
    ("code", "sig", "kwargs", "expected"),
    [
        (0, None, {}, ("success", "exited", "0")),
        (3, None, {}, ("exit-code", "exited", "3")),
        (3, None, {"success": [3]}, ("success", "exited", "3")),
        (None, 9, {}, ("signal", "killed", "KILL")),
        (None, 15, {"success": ["SIGTERM"]}, ("success", "killed", "TERM")),
        (None, 15, {"stop_signals": {3}}, ("success", "killed", "TERM")),  # systemd's clean set
        (None, 3, {"stop_signals": {3}}, ("success", "killed", "QUIT")),  # KillSignal=SIGQUIT
        (None, 9, {"stop_signals": {15}}, ("timeout", "killed", "KILL")),  # the final SIGKILL
        (None, 9, {"reason": "did not become ready within 1 s"}, ("timeout", "killed", "KILL")),
        (None, 6, {"reason": "watchdog timeout"}, ("watchdog", "killed", "ABRT")),
        (1, None, {"reason": "forking: no PID file"}, ("protocol", "exited", "1")),
        (None, 9, {"reason": "field 'exec_start_post': x"}, ("exit-code", "killed", "KILL")),
    ],
)  # fmt: skip
def test_stop_post_environment(
    code: int | None, sig: int | None, kwargs: dict[str, Any], expected: tuple[str, ...]
) -> None:
    env = stop_post_environment(code, sig, **kwargs)
    assert (env["SERVICE_RESULT"], env["EXIT_CODE"], env["EXIT_STATUS"]) == expected
    assert stop_post_environment(None, None) == {"SERVICE_RESULT": "exit-code"}


def test_stop_post_maps_from_the_unit(tmp_path: Path) -> None:
    unit = write_unit(
        tmp_path, "p.service", "[Service]\nExecStart=/bin/a\nExecStopPost=-/bin/b x\n"
    )
    spec = load_unit(unit)
    assert [c.text() for c in spec.fields["exec_stop_post"]] == ["-/bin/b x"]
    assert not any("ExecStopPost" in w for w in spec.warnings)


# -- StartLimitIntervalSec= / StartLimitBurst= -----------------------------------------------


@pytest.mark.parametrize(
    ("lines_", "expected"),
    [
        ("[Unit]\nStartLimitIntervalSec=30\nStartLimitBurst=3\n", (2, 30.0)),
        ("[Service]\nStartLimitInterval=1min\nStartLimitBurst=4\n", (3, 60.0)),  # before v230
        ("[Unit]\nStartLimitBurst=2\n", (1, 10.0)),  # systemd's default interval
        ("[Unit]\nStartLimitIntervalSec=5\n", (4, 5.0)),  # and burst
        ("[Unit]\nStartLimitIntervalSec=0\nStartLimitBurst=3\n", None),  # 0: no limit
        ("[Unit]\nStartLimitBurst=0\n", None),
        ("", None),  # nothing set: no limit (systemd's defaults are not applied)
    ],
)
def test_start_limit_maps_to_max_restarts_in_a_window(
    tmp_path: Path, lines_: str, expected: tuple[int, float] | None
) -> None:
    unit = write_unit(tmp_path, "l.service", lines_ + "[Service]\nExecStart=/bin/a\n")
    fields = load_unit(unit).fields
    got = (fields["max_restarts"], fields["restart_window"]) if "max_restarts" in fields else None
    assert got == expected


def test_a_bad_start_limit_names_file_and_line(tmp_path: Path) -> None:
    unit = write_unit(
        tmp_path, "b.service", "[Unit]\nStartLimitBurst=many\n[Service]\nExecStart=/a\n"
    )
    with pytest.raises(ConfigError, match=rf"{unit}:2: StartLimitBurst= expected a number"):
        load_unit(unit)


def test_a_unit_that_keeps_crashing_hits_its_start_limit(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    out, unit = service_writing_to(
        tmp_path,
        "flaps",
        """
        ExecStart=/bin/sh -c 'echo start >> {out}/starts; exit 1'
        Restart=always
        RestartSec=0
        """,
    )
    unit.write_text("[Unit]\nStartLimitIntervalSec=60\nStartLimitBurst=3\n" + unit.read_text())
    inst = run_units(ikosd_factory, {"flaps": unit})
    st = inst.wait_gave_up("flaps")
    # Burst starts in the interval: the first and two restarts, then start-limit-hit
    assert (out / "starts").read_text().splitlines() == ["start"] * 3
    assert st["restarts"] == 2
    assert "within 60 s: start-limit-hit" in st["last_exit"]["reason"]
    # an operator's start opens a new window, as systemd's reset-failed
    inst.ctl("start", "flaps")
    wait_for(lambda: len((out / "starts").read_text().splitlines()) >= 6, 30)


# -- RootDirectory= ---------------------------------------------------------------------------

#: A static program for the chroot (nothing else is in it): writes "proof" in its working
#: directory and its argv[1] there, then waits for a signal.
JAILED = r"""
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open("proof", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return 3;
    const char *what = argc > 1 ? argv[1] : "-";
    write(fd, what, strlen(what));
    write(fd, "\n", 1);
    close(fd);
    if (argc > 2) return 0;  /* a command: done */
    pause();
    return 0;
}
"""


@pytest.fixture(scope="module")
def jail(tmp_path_factory: Any) -> Path:
    """A directory with /bin/jailed (static) and /data, to chroot into."""
    cc = shutil.which("cc")
    if cc is None or os.geteuid() != 0:
        pytest.skip("needs a C compiler and root (chroot)")
    root = tmp_path_factory.mktemp("jail")
    (root / "bin").mkdir()
    (root / "data").mkdir()
    source = root.parent / "jailed.c"
    source.write_text(JAILED)
    built = subprocess.run(
        [cc, "-static", "-Os", "-o", str(root / "bin" / "jailed"), str(source)],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        pytest.skip(f"no static libc to build the chroot's program: {built.stderr[-300:]}")
    return root


def test_root_directory_chroots_the_daemon_and_its_commands(
    ikosd_factory: Any, tmp_path: Path, jail: Path
) -> None:
    unit = write_unit(
        tmp_path,
        "jailed.service",
        f"""
        [Service]
        RootDirectory={jail}
        WorkingDirectory=/data
        ExecStartPre=/bin/jailed pre done
        ExecStart=jailed main
        Restart=always
        """,
    )
    inst = run_units(ikosd_factory, {"jailed": unit})
    pid = inst.wait_state("jailed", "running", timeout=30)["pid"]
    proof = jail / "data" / "proof"
    assert lines(proof, 2) == ["pre", "main"]  # the paths were the jail's
    assert os.readlink(f"/proc/{pid}/root") == str(jail)
    assert os.readlink(f"/proc/{pid}/cwd") == str(jail / "data")
    os.kill(pid, signal.SIGKILL)
    new = inst.wait_running_new_pid("jailed", pid, timeout=30)
    assert os.readlink(f"/proc/{new}/root") == str(jail)
    inst.ctl("stop", "jailed", check=True)
    inst.wait_state("jailed", "stopped")


def test_root_directory_is_refused_where_it_cannot_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = write_unit(
        tmp_path, "r.service", f"[Service]\nRootDirectory={tmp_path}\nExecStart=/bin/a\n"
    )
    assert load_unit(unit).fields["root_directory"] == str(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match=rf"{unit}:2: RootDirectory= chroot into .* needs"):
        load_unit(unit)
    # at start too, naming the field: not root, or the directory gone since
    spec = ikos.Exec("j", "/bin/a", root_directory=str(tmp_path / "gone"))
    with pytest.raises(SpawnError, match=r"field .root_directory.: chroot into .* needs root"):
        build_exec_plan(spec, InstancePaths.for_root(tmp_path))
    monkeypatch.undo()
    with pytest.raises(SpawnError, match=r"field .root_directory.: .*gone is not a directory"):
        build_exec_plan(spec, InstancePaths.for_root(tmp_path))


def test_a_command_left_by_a_crashed_ikosd_is_found_by_its_mark(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    # KillMode=process: the commands run apart from the daemon's cgroup, so only
    # their environment tells the next ikosd that they are this instance's
    out, unit = service_writing_to(
        tmp_path,
        "stuck",
        """
        KillMode=process
        ExecStartPre=/bin/sh -c 'echo $$$$ > {out}/pre; exec sleep 1000'
        ExecStart=/bin/sleep 1000
        """,
    )
    config = f'[executables.stuck]\nunit = "{unit}"\n'
    inst = ikosd_factory(config=config, name="same", args=["--metrics", "off"], wait_ready=False)
    pre = read_pid(out / "pre")  # ikosd is not ready: its tree waits for this start
    wait_for(lambda: b"IKOS_DAEMON=stuck\0" in Path(f"/proc/{pre}/environ").read_bytes(), 20)
    environ = Path(f"/proc/{pre}/environ").read_bytes()
    assert b"IKOS_INSTANCE=" in environ
    (out / "pre").unlink()
    inst.crash()
    assert alive(pre)  # the crash left it
    again = ikosd_factory(config=config, name="same", args=["--metrics", "off"], wait_ready=False)
    wait_for(
        lambda: not alive(pre), 30, message="the next ikosd to stop the crashed start's command"
    )
    wait_for(lambda: f"pid {pre}" in again.log_text(), 20, message="a line naming it")
    read_pid(out / "pre")  # and the start begins again
