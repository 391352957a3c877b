"""PID files that ikos writes for daemons of every type but ``forking`` (issue 12, item 2).

The unit tests pin :class:`DaemonPidFile`'s refusals (a missing directory, a
planted symbolic link, another user's file) and its atomic replacement; the
live tests run the real ikosd and check the file as a user's script reads
it: written once the daemon runs, replaced on restart, removed on stop and
at shutdown, and still right after ``kill -9`` of ikosd and adoption.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from ikos.platform._pidfile import DaemonPidFile, PidFileError, remove_stale_pid_files


def content(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


# -- DaemonPidFile ---------------------------------------------------------------------


def test_write_replaces_atomically_and_remove_only_removes_its_own(tmp_path: Path) -> None:
    path = tmp_path / "d.pid"
    pid_file = DaemonPidFile(path)
    pid_file.write(1234)
    assert content(path) == "1234\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    inode = path.stat().st_ino
    pid_file.write(5678)
    assert content(path) == "5678\n"
    assert path.stat().st_ino != inode, "replaced by a rename, never rewritten in place"
    assert [p.name for p in tmp_path.iterdir()] == ["d.pid"], "no temporary file left"
    # someone else's PID at the name (a successor's) is not ours to remove
    path.write_text("999\n")
    assert not pid_file.remove()
    assert content(path) == "999\n"
    pid_file.write(42)
    assert pid_file.remove()
    assert not path.exists()
    assert not pid_file.remove(), "nothing written: nothing removed"


def test_missing_directory_is_refused_with_its_name(tmp_path: Path) -> None:
    pid_file = DaemonPidFile(tmp_path / "nowhere" / "d.pid")
    with pytest.raises(PidFileError, match=r"its directory .*nowhere does not exist"):
        pid_file.check()
    with pytest.raises(PidFileError, match="does not exist"):
        pid_file.write(1)


def test_a_planted_symbolic_link_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "d.pid"
    path.symlink_to(victim)
    with pytest.raises(PidFileError, match="symbolic link"):
        DaemonPidFile(path).check()
    with pytest.raises(PidFileError, match="symbolic link"):
        DaemonPidFile(path).write(1234)
    assert victim.read_text() == "precious\n"
    assert path.is_symlink()


def test_a_directory_or_another_users_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.pid").mkdir()
    with pytest.raises(PidFileError, match="not a regular file"):
        DaemonPidFile(tmp_path / "dir.pid").check()
    theirs = tmp_path / "theirs.pid"
    theirs.write_text("77\n")
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PidFileError, match="belongs to uid 65534"):
        DaemonPidFile(theirs).write(1234)
    assert content(theirs) == "77\n"
    # the daemon's own user may have rewritten it: that one is replaced
    DaemonPidFile(theirs, owners=[65534]).write(1234)
    assert content(theirs) == "1234\n"


def test_stale_pid_files_are_found_through_their_notes(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    files = {name: tmp_path / f"{name}.pid" for name in ("dead", "kept", "reused", "gone")}
    for name, path in files.items():
        DaemonPidFile(path, note=notes / name).write(os.getpid() if name != "dead" else 999_999)
    assert {p.name for p in notes.iterdir()} == set(files)
    # "dead" names no process; "gone" names the PID the state recorded (it was stopped);
    # "reused" names a live process that is not the one recorded: left alone
    removed = remove_stale_pid_files(notes, keep=["kept"], gone={"gone": os.getpid()})
    assert sorted(removed) == sorted(str(files[n]) for n in ("dead", "gone"))
    assert files["kept"].exists() and files["reused"].exists()
    assert [p.name for p in notes.iterdir()] == ["kept"]
    # the note goes with the file when ikos removes it itself
    pid_file = DaemonPidFile(files["kept"], note=notes / "kept")
    pid_file.write(os.getpid())
    assert pid_file.remove() and not list(notes.iterdir())


# -- live ----------------------------------------------------------------------------


def exec_config(pid_file: Path, **extra: str) -> str:
    fields = "".join(f"{key} = {value}\n" for key, value in extra.items())
    return f"""
[ikosd]
metrics = false

[executables.web]
executable = "/bin/sleep"
args = ["1000"]
pid_file = "{pid_file}"
{fields}"""


def test_pid_file_written_replaced_on_restart_removed_on_stop(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    path = tmp_path / "web.pid"
    inst = ikosd_factory(config=exec_config(path))
    first = inst.wait_state("web", "running")["pid"]
    wait_for(lambda: content(path) == f"{first}\n", message="the PID file of the first run")

    inst.ctl("restart", "web", check=True)
    second = inst.wait_running_new_pid("web", first)
    wait_for(lambda: content(path) == f"{second}\n", message="the PID file of the restart")

    # a crash (restart by the supervisor) replaces it too
    os.kill(second, 9)
    third = inst.wait_running_new_pid("web", second)
    wait_for(lambda: content(path) == f"{third}\n", message="the PID file after a crash")

    inst.ctl("stop", "web", check=True)
    wait_for(lambda: not path.exists(), message="the PID file removed on stop")
    inst.ctl("start", "web", check=True)
    fourth = inst.wait_running_new_pid("web", third)
    wait_for(lambda: content(path) == f"{fourth}\n")
    assert inst.terminate() == 0
    assert not path.exists(), "ikosd's shutdown removes it"


def test_relative_pid_file_is_under_the_run_directory_and_oneshot_gets_one_too(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    done = tmp_path / "done"
    inst = ikosd_factory(
        config=f"""
[ikosd]
metrics = false

[executables.web]
executable = "/bin/sleep"
args = ["1000"]
pid_file = "web.pid"

[executables.job]
executable = "/bin/sh"
args = ["-c", "while [ ! -e {done} ]; do sleep 0.02; done"]
type = "oneshot"
restart = "temporary"
pid_file = "job.pid"
start_timeout = 120
""",
        wait_ready=False,
    )
    run_dir = inst.root / "run" / "ikos"
    job = wait_for(lambda: inst.status("job")["pid"], 60, message="job started")
    wait_for(lambda: content(run_dir / "job.pid") == f"{job}\n", message="the oneshot's file")
    done.touch()
    wait_for(lambda: not (run_dir / "job.pid").exists(), 60, message="removed at its exit")
    web = inst.wait_state("web", "running")["pid"]
    wait_for(lambda: content(run_dir / "web.pid") == f"{web}\n")


def test_pid_file_refusals_fail_the_start_naming_the_field(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    planted = tmp_path / "planted.pid"
    planted.symlink_to(victim)
    inst = ikosd_factory(
        config=f"""
[ikosd]
metrics = false

[root]
max_restarts = 100

[executables.lost]
executable = "/bin/sleep"
args = ["1000"]
restart = "temporary"
pid_file = "{tmp_path / "missing" / "lost.pid"}"

[executables.trap]
executable = "/bin/sleep"
args = ["1000"]
restart = "temporary"
pid_file = "{planted}"

[executables.fine]
executable = "/bin/sleep"
args = ["1000"]
""",
        wait_ready=False,
    )
    inst.wait_state("fine", "running")

    def refusals() -> str:
        text: str = inst.log_text()
        return text if "field 'pid_file'" in text and "symbolic link" in text else ""

    log = wait_for(refusals, 60, message="both refusals logged")
    assert f"{tmp_path / 'missing'} does not exist" in log
    assert victim.read_text() == "precious\n"
    assert planted.is_symlink()
    assert inst.status("lost")["pid"] is None and inst.status("trap")["pid"] is None


def test_pid_file_stays_right_across_kill_9_of_ikosd_and_adoption(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    path = tmp_path / "web.pid"
    config = exec_config(path)
    first = ikosd_factory(config=config, name="same")
    pid = first.wait_state("web", "running")["pid"]
    wait_for(lambda: content(path) == f"{pid}\n")
    first.crash()
    assert content(path) == f"{pid}\n", "a crash of ikosd leaves the daemon and its file"
    path.unlink()  # lost meanwhile (a tmpfiles clean-up): the adopter writes it again
    second = ikosd_factory(config=config, name="same")
    assert second.wait_state("web", "running")["pid"] == pid, "adopted, not restarted"
    wait_for(lambda: content(path) == f"{pid}\n", message="the adopter's PID file")
    assert second.terminate() == 0
    assert not path.exists()


@pytest.mark.skipif(
    shutil.which("systemd-notify") is None,
    reason="systemd-notify is missing: run scripts/test-deps.sh as root (apt-get install systemd)",
)
def test_notify_daemon_pid_file_follows_mainpid(ikosd_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "svc.pid"
    gate = tmp_path / "go"
    script = (
        f"while [ ! -e {gate} ]; do sleep 0.02; done; sleep 1000 & "
        "systemd-notify --ready MAINPID=$!; exec sleep 1001"
    )
    inst = ikosd_factory(
        config=f"""
[ikosd]
metrics = false

[executables.svc]
executable = "/bin/sh"
args = ["-c", "{script}"]
type = "notify"
pid_file = "{path}"
""",
        wait_ready=False,
    )
    first = wait_for(lambda: inst.status("svc")["pid"], 60, message="svc started")
    # written once the exec succeeded, before READY=1: it names the running main process
    wait_for(lambda: content(path) == f"{first}\n", 60, message="the first main PID")
    assert inst.status("svc")["state"] == "starting"
    gate.touch()
    main = inst.wait_state("svc", "running")["pid"]
    assert main != first
    wait_for(lambda: content(path) == f"{main}\n", message="the PID file follows MAINPID=")
    assert inst.terminate() == 0
    assert not path.exists()


def test_a_daemon_removed_from_the_tree_during_a_crash_loses_its_pid_file(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    path = tmp_path / "web.pid"
    first = ikosd_factory(config=exec_config(path), name="same")
    pid = first.wait_state("web", "running")["pid"]
    wait_for(lambda: content(path) == f"{pid}\n")
    first.crash()
    # the next ikosd's tree no longer has it: as for any such orphan, the process is
    # stopped (recovery: "it is no longer in the tree"), and now its PID file goes too
    second = ikosd_factory(
        config='[ikosd]\nmetrics = false\n\n[executables.other]\nexecutable = "/bin/sleep"\n'
        'args = ["1000"]\n',
        name="same",
    )
    second.wait_state("other", "running")
    assert not path.exists(), "the stale PID file of the removed daemon"
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), message="the orphan stopped")
    assert "no longer in the tree" in second.log_text()
    assert f"removed {path}, the PID file of a daemon that no longer runs" in second.log_text()
    assert second.terminate() == 0
