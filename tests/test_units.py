"""systemd units: the parser, the command-line rules, the mapping to ikos.Exec, the errors.

The first part is pure (``ikos/platform/_unit.py`` returns values): syntax,
quoting (with a property test: what :meth:`UnitCommand.text` writes splits
back to the same command), expansion, every directive's mapping, and the
errors and warnings that name file and line. The second loads units through
``ikos.toml`` (``unit = ...``, ``[units] directory``). The last part runs
small units written here under the real ikosd, for what the manager does
for units: ExecStartPre/Post/Stop/Reload commands with their prefixes,
``$VAR`` expansion, RuntimeDirectory= under the instance root,
SuccessExitStatus=/RestartPreventExitStatus=. Debian's own units are in
``tests/test_units_debian.py``.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from hypothesis import given
from hypothesis import strategies as st

import ikos
from ikos._errors import ConfigError
from ikos.manager._config import load_config
from ikos.platform._unit import (
    UnitCommand,
    UnitError,
    expand_variables,
    link_units,
    load_unit,
    parse_timespan,
    parse_unit_text,
    read_unit,
    split_command,
    split_words,
    unit_fields,
)
from ikos.supervision._runtime import ExitReason, should_restart_spec


def write_unit(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# -- syntax ----------------------------------------------------------------------------------


def test_syntax_sections_comments_continuations_and_lines() -> None:
    text = "# a comment\n[Unit]\n; another\nDescription = Web  server \n\n[Service]\n"
    text += "ExecStart=/bin/echo a \\\n  # skipped inside the continuation\n  b\nEnvironment=\n"
    got = [(d.section, d.key, d.value, d.line) for d in parse_unit_text(text, "x.service")]
    assert got == [
        ("Unit", "Description", "Web  server", 4),
        ("Service", "ExecStart", "/bin/echo a  b", 7),
        ("Service", "Environment", "", 10),
    ]


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("Description=x\n", 1, "outside of any [Section]"),
        ("[Unit]\n\nnot an assignment\n", 3, "expected Key=Value"),
        ("[Unit\n", 1, "expected a section"),
    ],
)
def test_syntax_errors_name_file_and_line(text: str, line: int, why: str) -> None:
    with pytest.raises(UnitError) as info:
        parse_unit_text(text, "/u/x.service")
    assert info.value.line == line and why in str(info.value)
    assert str(info.value).startswith(f"/u/x.service:{line}:")


# -- command lines ---------------------------------------------------------------------------


def test_words_quotes_escapes_and_separators() -> None:
    text = r"""/bin/x 'a b' "c \"d\" \x41\n" e\sf \; ; g"""
    assert split_words(text) == [
        ("/bin/x", False),
        ("a b", False),
        ('c "d" A\n', False),
        ("e f", False),
        (";", False),
        (";", True),
        ("g", False),
    ]


def test_commands_and_prefixes() -> None:
    commands = split_command("-/bin/a 1 ; @:/bin/b argv0 $X ; +/bin/c ; !!/bin/d")
    assert commands == [
        UnitCommand(("/bin/a", "1"), ignore_failure=True),
        UnitCommand(("/bin/b", "$X"), argv0="argv0", expand=False),
        UnitCommand(("/bin/c",), privileged=True),
        UnitCommand(("/bin/d",)),
    ]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("/bin/a 'open", "unclosed ' quote"),
        ("/bin/a ; ; /bin/b", "empty command"),
        ("@/bin/a", "needs the argv[0] word"),
        ("+!/bin/a", "exclude each other"),
        ("$PROG x", "cannot come from a variable"),
        (r"/bin/a \q", "unknown escape"),
        ("/bin/a 'x'y", "right after a closing"),
    ],
)
def test_bad_command_lines(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        split_command(text)


_word = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1
)


@given(
    program=st.from_regex(r"/[a-z]{1,8}(/[a-z0-9_.]{1,8}){0,2}", fullmatch=True),
    args=st.lists(_word, max_size=6),
    ignore=st.booleans(),
    privileged=st.booleans(),
    argv0=st.none() | _word,
    expand=st.booleans(),
)
def test_a_command_written_back_splits_to_itself(
    program: str, args: list[str], ignore: bool, privileged: bool, argv0: str | None, expand: bool
) -> None:
    command = UnitCommand((program, *args), ignore, privileged, argv0, expand)
    assert split_command(command.text()) == [command]


@given(st.lists(st.sampled_from(["a", "b c", "$", "''", '"', "\\", ";", "\t", "é"]), max_size=8))
def test_splitting_never_fails_on_what_text_quotes(parts: list[str]) -> None:
    word = "".join(parts) or "x"
    assert split_command(UnitCommand(("/bin/x", word)).text())[0].argv == ("/bin/x", word)


def test_expansion_rules() -> None:
    env = {"A": "one  two", "B": "x y"}
    words = ["$A", "${A}", "pre${B}post", "$B$A", "$$A", "$MISSING", "${MISSING}z"]
    assert expand_variables(words, env) == [
        "one",
        "two",
        "one  two",
        "prex ypost",
        "$B$A",
        "$A",
        "z",
    ]


def test_timespans() -> None:
    assert parse_timespan("5") == 5.0
    assert parse_timespan("1min 30s") == 90.0
    assert parse_timespan("2h") == 7200.0
    assert parse_timespan("100ms") == pytest.approx(0.1)
    assert parse_timespan("infinity") is None
    with pytest.raises(ValueError, match="unknown time unit"):
        parse_timespan("5 fortnights")


# -- mapping ---------------------------------------------------------------------------------

FULL_UNIT = """
[Unit]
Description=Test daemon %n
Requires=db.service
Wants=cache.service
After=network.target db.service
Before=web.service
Documentation=man:x(8)

[Service]
Type=notify
Environment="GREETING=hello world" MODE=fast
Environment=DIR=%t/app
EnvironmentFile=-/etc/default/app
ExecStartPre=/bin/true
ExecStartPre=
ExecStartPre=-/bin/false
ExecStart=@/usr/bin/app app-main --dir ${DIR} $OPTS
ExecStartPost=/bin/echo started
ExecReload=/bin/kill -HUP $MAINPID
ExecStop=/bin/kill -TERM $MAINPID
User=daemon
Group=daemon
SupplementaryGroups=adm
SupplementaryGroups=tty
WorkingDirectory=/tmp
UMask=0027
LimitNOFILE=1024:4096
LimitCORE=infinity
LimitSTACK=8M
LimitCPU=1min
MemoryMax=256M
Restart=on-failure
RestartSec=2s
SuccessExitStatus=143 SIGUSR1
RestartPreventExitStatus=3
TimeoutStartSec=20
TimeoutStopSec=infinity
KillMode=mixed
KillSignal=SIGINT
WatchdogSec=30
NotifyAccess=all
RuntimeDirectory=app app/sub
RuntimeDirectoryMode=0750
StateDirectory=app
StandardOutput=journal
StandardError=append:/var/log/app.err
PrivateTmp=yes
ProtectSystem=full
PrivateTmp=no

[Install]
WantedBy=multi-user.target
"""


def test_every_supported_directive_maps(tmp_path: Path) -> None:
    path = write_unit(tmp_path, "app.service", FULL_UNIT)
    unit = load_unit(path, root=tmp_path / "inst")
    root = tmp_path / "inst"
    assert unit.name == "app" and unit.executable == "/usr/bin/app"
    assert unit.requires == ("db.service", "cache.service")
    assert unit.after == ("network.target", "db.service")
    assert unit.before == ("web.service",)
    spec = ikos.Exec.from_unit(path, root=root)
    o = spec.options
    assert spec.description == "Test daemon app.service"
    assert o.type == "notify"
    assert o.args == ("--dir", "${DIR}", "$OPTS") and o.argv0 == "app-main"
    assert o.expand_environment
    assert o.environment == {
        "GREETING": "hello world",
        "MODE": "fast",
        "DIR": f"{root}/run/app",
        "RUNTIME_DIRECTORY": f"{root}/run/app:{root}/run/app/sub",
        "STATE_DIRECTORY": f"{root}/var/lib/app",
    }
    assert o.environment_files == ("-/etc/default/app",)
    # the empty ExecStartPre= dropped the first one
    assert [c.text() for c in o.exec_start_pre] == ["-/bin/false"]
    assert [c.text() for c in o.exec_start_post] == ["/bin/echo started"]
    assert [c.text() for c in o.exec_reload] == ["/bin/kill -HUP $MAINPID"]
    assert [c.text() for c in o.exec_stop] == ["/bin/kill -TERM $MAINPID"]
    assert o.reloadable
    assert (o.user, o.group, o.supplementary_groups) == ("daemon", "daemon", ("adm", "tty"))
    assert o.working_directory == "/tmp" and o.umask == 0o027
    assert o.limits.nofile == (1024, 4096) and o.limits.core == resource.RLIM_INFINITY
    assert o.limits.stack == 8 << 20 and o.limits.cpu == 60
    assert o.limits.memory_max == 256 << 20
    assert spec.restart_on == "on-failure" and spec.restart_delay == 2.0
    assert spec.success_exit_status == (143, "SIGUSR1")
    assert spec.restart_prevent_exit_status == (3,)
    assert spec.start_timeout == 20.0 and spec.shutdown == "infinity"
    assert o.kill_mode == "control-group" and o.stop_signal == signal.SIGINT
    assert o.watchdog_sec == 30.0
    assert o.directories == {
        f"{root}/run/app": 0o750,
        f"{root}/run/app/sub": 0o750,
        f"{root}/var/lib/app": 0o755,
    }
    assert (o.stdout, o.stderr) == ("log", "append:/var/log/app.err")
    # each unsupported directive once, at its first line; nothing about the supported ones
    lines = path.read_text().splitlines()
    assert unit.warnings == (
        f"{path}:{lines.index('PrivateTmp=yes') + 1}: PrivateTmp= is not supported by ikos; "
        "ignored",
        f"{path}:{lines.index('ProtectSystem=full') + 1}: ProtectSystem= is not supported by "
        "ikos; ignored",
    )


def test_the_last_setting_wins_and_an_empty_one_resets(tmp_path: Path) -> None:
    text = (
        "[Unit]\nAfter=a.service\nAfter=\nAfter=b.service\n"
        "[Service]\nExecStart=/bin/x\nType=forking\nType=\nUser=one\nUser=two\n"
        "LimitNOFILE=10\nLimitNOFILE=\nLimitCORE=0\nRuntimeDirectory=r\nRuntimeDirectory=\n"
        "Environment=A=1\nEnvironment=\nEnvironment=B=2\n"
    )
    path = write_unit(tmp_path, "s.service", text)
    unit = load_unit(path)
    assert unit.after == ("b.service",)
    spec = ikos.Exec.from_unit(path)
    o = spec.options
    assert (o.type, o.user, o.limits.nofile, o.limits.core) == ("simple", "two", None, 0)
    assert o.directories == {} and o.environment == {"B": "2"}


def test_systemd_defaults_where_ikos_differs(tmp_path: Path) -> None:
    path = write_unit(tmp_path, "plain.service", "[Service]\nExecStart=/bin/sleep 100\n")
    spec = ikos.Exec.from_unit(path)
    assert spec.restart_on == "no"  # systemd's Restart= default
    assert spec.start_timeout == 90.0 and spec.shutdown == 90.0
    assert spec.options.type == "simple" and not spec.options.reloadable


def test_overrides_win_and_a_reload_given_makes_it_reloadable(tmp_path: Path) -> None:
    path = write_unit(tmp_path, "plain.service", "[Service]\nExecStart=/bin/sleep 100\n")
    spec = ikos.Exec.from_unit(path, "other", restart_on="always", reload_signal="USR1")
    assert spec.name == "other" and spec.restart_on == "always"
    assert spec.options.reloadable and spec.options.reload_signal == signal.SIGUSR1


def test_send_sigkill_no_waits_for_the_stop_signal(tmp_path: Path) -> None:
    text = "[Service]\nExecStart=/bin/sleep 100\nTimeoutStopSec=5\nSendSIGKILL=no\n"
    assert ikos.Exec.from_unit(write_unit(tmp_path, "s.service", text)).shutdown == "infinity"


def test_templates_and_specifiers(tmp_path: Path) -> None:
    write_unit(
        tmp_path,
        "worker@.service",
        r"""
        [Unit]
        Description=Worker %i (%I) of %p, unit %n %N
        [Service]
        ExecStart=/bin/echo %i %f %t/%p 100%%
        """,
    )
    unit = load_unit(tmp_path / r"worker@a\x2db.service", root="/srv/inst")
    assert unit.name == r"worker@a\x2db"
    assert unit.fields["description"] == (
        r"Worker a\x2db (a-b) of worker, unit worker@a\x2db.service worker@a\x2db"
    )
    # as systemd: specifiers first, then the Exec line's own unescaping (\x2d is '-')
    assert unit.fields["args"] == ["a-b", "/a-b", "/srv/inst/run/worker", "100%"]


def test_drop_ins_override_in_name_order(tmp_path: Path) -> None:
    path = write_unit(tmp_path, "d.service", "[Service]\nExecStart=/bin/a\nEnvironment=A=1\n")
    write_unit(tmp_path, "d.service.d/20-b.conf", "[Service]\nEnvironment=B=2\nUMask=077\n")
    write_unit(tmp_path, "d.service.d/10-a.conf", "[Service]\nEnvironment=\nUMask=022\n")
    name, directives = read_unit(path)
    assert name == "d.service"
    assert [Path(d.file).name for d in directives][-4:] == [
        "10-a.conf",
        "10-a.conf",
        "20-b.conf",
        "20-b.conf",
    ]
    spec = ikos.Exec.from_unit(path)
    assert spec.options.environment == {"B": "2"} and spec.options.umask == 0o077


def test_an_administrators_drop_in_wins_over_one_of_the_same_name(
    tmp_path: Path, monkeypatch: Any
) -> None:
    etc = tmp_path / "etc"
    monkeypatch.setattr("ikos.platform._unit.SYSTEM_UNIT_DIRS", (str(etc),))
    path = write_unit(tmp_path / "lib", "t@.service", "[Service]\nExecStart=/bin/a\n")
    write_unit(tmp_path / "lib", "t@.service.d/50-x.conf", "[Service]\nUMask=011\n")
    write_unit(tmp_path / "lib", "t@.service.d/60-y.conf", "[Service]\nNice=1\n")
    write_unit(etc, "t@.service.d/50-x.conf", "[Service]\nUMask=022\n")
    write_unit(etc, "t@i.service.d/55-z.conf", "[Service]\nEnvironment=Z=1\n")
    _, directives = read_unit(path.with_name("t@i.service"))
    assert [(Path(d.file).parent.parent.name, Path(d.file).name) for d in directives[1:]] == [
        ("etc", "50-x.conf"),
        ("etc", "55-z.conf"),
        ("lib", "60-y.conf"),
    ]


def test_oneshot_may_have_several_exec_start(tmp_path: Path) -> None:
    text = "[Service]\nType=oneshot\nExecStart=/bin/a\nExecStart=/bin/b x\n"
    spec = ikos.Exec.from_unit(write_unit(tmp_path, "o.service", text))
    assert spec.executable == "/bin/a"
    assert [c.text() for c in spec.options.exec_start_post] == ["/bin/b x"]


@pytest.mark.parametrize(
    ("body", "line", "key", "why"),
    [
        ("Type=simple\n", None, "ExecStart", "missing: a service needs the command it runs"),
        ("Type=forkin\nExecStart=/bin/a\n", 2, "Type", "an unknown Type 'forkin'"),
        ("Type=dbus\nExecStart=/bin/a\n", 2, "Type", "Type=dbus is not supported"),
        ("ExecStart=/bin/a\nExecStart=/bin/b\n", 3, "ExecStart", "only Type=oneshot allows"),
        ("ExecStart=/bin/a 'x\n", 2, "ExecStart", "unclosed ' quote"),
        ("ExecStart=+/bin/a\n", 2, "ExecStart", "the + prefix"),
        ("ExecStart=/bin/a\nRootImage=/srv/x.img\n", 3, "RootImage", "cannot run without it"),
        ("ExecStart=/bin/a\nRootDirectory=/nowhere/x\n", 3, "RootDirectory", "not a directory"),
        ("ExecStart=/bin/a\nRootDirectory=srv\n", 3, "RootDirectory", "an absolute path"),
        ("ExecStart=/bin/a\nDynamicUser=yes\n", 3, "DynamicUser", "would run as root"),
        ("ExecStart=/bin/a\nRestart=sometimes\n", 3, "Restart", "on-failure"),
        ("ExecStart=/bin/a\nTimeoutStartSec=soon\n", 3, "TimeoutStartSec", "a time span"),
        ("ExecStart=/bin/a %z\n", 2, "ExecStart", "unknown specifier %z"),
        ("ExecStart=/bin/a\nStandardInput=socket\n", 3, "StandardInput", "no socket activation"),
        ("ExecStart=/bin/a\nRuntimeDirectory=../x\n", 3, "RuntimeDirectory", "without '..'"),
    ],
)
def test_a_unit_that_cannot_run_is_refused_naming_file_and_line(
    tmp_path: Path, body: str, line: int | None, key: str, why: str
) -> None:
    path = write_unit(tmp_path, "bad.service", "[Service]\n" + body)
    with pytest.raises(UnitError) as info:
        ikos.Exec.from_unit(path)
    err = info.value
    assert (err.file, err.line, err.key) == (str(path), line, key)
    where = f"{path}:{line}" if line else str(path)
    assert str(err).startswith(f"{where}: {key}= ") and why in str(err), str(err)


def test_a_value_ikos_refuses_names_the_unit_file(tmp_path: Path) -> None:
    path = write_unit(tmp_path, "u.service", "[Service]\nExecStart=/bin/a\nUMask=999\n")
    with pytest.raises(UnitError, match=rf"^{path}: .*umask"):
        ikos.Exec.from_unit(path)


def test_a_missing_unit_says_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(UnitError, match=r"no unit file .*nope@x\.service or .*nope@\.service"):
        load_unit(tmp_path / "nope@x.service")


def test_from_unit_logs_each_warning_once(tmp_path: Path, caplog: Any) -> None:
    text = "[Unit]\nAfter=network.target\n[Service]\nExecStart=/bin/a\nNice=5\nNice=6\n"
    path = write_unit(tmp_path, "w.service", text)
    with caplog.at_level(logging.WARNING, logger="ikos.unit"):
        ikos.Exec.from_unit(path)
    assert caplog.messages == [
        f"{path}:5: Nice= is not supported by ikos; ignored",
        f"{path}:2: After=network.target is not run by ikos; ignored",
    ]


def test_dependencies_link_between_known_units(tmp_path: Path) -> None:
    write_unit(tmp_path, "db.service", "[Service]\nExecStart=/bin/db\n")
    write_unit(
        tmp_path,
        "api.service",
        "[Unit]\nRequires=db.service\nAfter=db.service network.target\nBefore=web\n"
        "[Service]\nExecStart=/bin/api\n",
    )
    write_unit(tmp_path, "web.service", "[Service]\nExecStart=/bin/web\n")
    write_unit(tmp_path, "tpl@.service", "[Service]\nExecStart=/bin/tpl %i\n")
    specs = {s.name: s for s in ikos.Exec.from_units(tmp_path)}
    assert sorted(specs) == ["api", "db", "web"]  # the template is left out
    assert (specs["api"].requires, specs["api"].after) == (("db",), ("db",))
    assert specs["web"].after == ("api",)
    _, warnings = link_units([load_unit(tmp_path / "api.service")], {})
    api = tmp_path / "api.service"
    assert warnings == [  # each once, where first named
        f"{api}:2: Requires=db.service is not run by ikos; ignored",
        f"{api}:3: After=network.target is not run by ikos; ignored",
        f"{api}:4: Before=web is not run by ikos; ignored",
    ]


def test_restart_decisions_with_exit_statuses(tmp_path: Path) -> None:
    text = (
        "[Service]\nExecStart=/bin/a\nRestart=on-failure\n"
        "SuccessExitStatus=143 SIGUSR1\nRestartPreventExitStatus=3 SIGUSR2\n"
    )
    spec = ikos.Exec.from_unit(write_unit(tmp_path, "r.service", text))

    def exit_(code: int | None = None, sig: int | None = None) -> ExitReason:
        return ExitReason("x", code=code, signal=sig)

    assert should_restart_spec(spec, exit_(1))
    assert not should_restart_spec(spec, exit_(143))  # a success: on-failure does not restart
    assert not should_restart_spec(spec, exit_(sig=signal.SIGUSR1))
    assert should_restart_spec(spec, exit_(sig=signal.SIGKILL))
    assert not should_restart_spec(spec, exit_(3))  # prevented
    always = ikos.Exec.from_unit(write_unit(tmp_path, "r.service", text), restart_on="always")
    assert not should_restart_spec(always, exit_(sig=signal.SIGUSR2))
    assert should_restart_spec(always, exit_(0))


def test_mapping_is_pure_over_directives() -> None:
    directives = parse_unit_text("[Service]\nExecStart=/bin/a %i\n", "mem.service")
    spec = unit_fields("t@x.service", directives, file="mem.service")
    assert (spec.name, spec.fields["args"]) == ("t@x", ["x"])


# -- ikos.toml -------------------------------------------------------------------------------


def test_config_unit_key_with_overrides_and_warnings(tmp_path: Path) -> None:
    unit = write_unit(
        tmp_path,
        "units/app.service",
        "[Unit]\nAfter=db.service\nBefore=web.service\n[Service]\nExecStart=/bin/sleep 100\n"
        "ProtectHome=yes\n",
    )
    config = tmp_path / "ikos.toml"
    config.write_text(
        '[executables.db]\nexecutable = "/bin/sleep"\nargs = ["100"]\n\n'
        '[executables.app]\nunit = "units/app.service"\nrestart_on = "always"\n\n'
        '[executables.web]\nexecutable = "/bin/sleep"\nargs = ["100"]\n'
    )
    loaded = load_config(config, instance_root=tmp_path / "inst")
    app = next(c for c in loaded.tree.children if c.name == "app")
    assert isinstance(app, ikos.Exec)
    assert app.executable == "/bin/sleep" and app.restart_on == "always"
    assert app.after == ("db",)  # an executable named like the unit's dependency
    web = next(c for c in loaded.tree.children if c.name == "web")
    assert web.after == ("app",)  # Before=web.service
    assert f"{unit}:6: ProtectHome= is not supported by ikos; ignored" in loaded.warnings


def test_config_bad_unit_names_the_table_and_the_unit_line(tmp_path: Path) -> None:
    write_unit(tmp_path, "bad.service", "[Service]\nType=forkin\nExecStart=/bin/a\n")
    config = tmp_path / "ikos.toml"
    config.write_text('[executables.x]\nunit = "bad.service"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config)
    text = str(info.value)
    assert text.startswith(f"{config} [executables.x] key 'unit': expected a unit ikos can run")
    assert f"{tmp_path / 'bad.service'}:2: Type= an unknown Type 'forkin'" in text


def test_config_unit_and_executable_exclude_each_other(tmp_path: Path) -> None:
    write_unit(tmp_path, "a.service", "[Service]\nExecStart=/bin/a\n")
    config = tmp_path / "ikos.toml"
    config.write_text('[executables.x]\nunit = "a.service"\nexecutable = "/bin/b"\n')
    with pytest.raises(ConfigError, match="key 'executable': expected no 'executable' beside"):
        load_config(config)


def test_config_units_directory(tmp_path: Path) -> None:
    write_unit(tmp_path, "units/db.service", "[Service]\nExecStart=/bin/sleep 100\n")
    write_unit(
        tmp_path,
        "units/api.service",
        "[Unit]\nWants=db.service\n[Service]\nExecStart=/bin/sleep 100\nNice=3\n",
    )
    config = tmp_path / "ikos.toml"
    config.write_text(
        '[supervisors.svc]\n\n[units]\ndirectory = "units"\nsupervisor = "svc"\ncolour = 1\n'
    )
    loaded = load_config(config)
    svc = next(c for c in loaded.tree.children if c.name == "svc")
    assert isinstance(svc, ikos.Supervisor)
    by_name = {c.name: c for c in svc.children}
    assert sorted(by_name) == ["api", "db"] and by_name["api"].requires == ("db",)
    assert any("Nice= is not supported" in w for w in loaded.warnings)
    assert any("unknown key 'colour'" in w for w in loaded.warnings)
    config.write_text('[executables.db]\nexecutable = "/bin/true"\n[units]\ndirectory = "units"\n')
    with pytest.raises(ConfigError, match=r"\[units\] key 'directory'.*also \[executables.db\]"):
        load_config(config)


# -- under the real ikosd --------------------------------------------------------------------


def run_units(ikosd_factory: Any, tables: str) -> Any:
    config = "[root]\nmax_restarts = 50\nwithin = 60\n\n" + tables
    return ikosd_factory(config=config, args=["--metrics", "off"])


def test_commands_expansion_and_directories_under_ikosd(ikosd_factory: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env_file = tmp_path / "app.env"
    env_file.write_text("OPTS=--one --two\n")
    unit = write_unit(
        tmp_path,
        "app.service",
        f"""
        [Service]
        Environment=OUT={out} "SPACED=a b"
        EnvironmentFile={env_file}
        ExecStartPre=/bin/sh -c 'echo pre > $OUT/pre'
        ExecStartPre=-/bin/false
        ExecStart=/bin/sh -c 'echo "$$0 $$@" > ${{OUT}}/args; exec sleep 1000' \\
            ikos $OPTS ${{SPACED}}
        ExecStartPost=/bin/sh -c 'echo $MAINPID > $OUT/post'
        ExecReload=/bin/sh -c 'echo reload $MAINPID >> $OUT/reloads'
        ExecStop=/bin/sh -c 'echo stop $MAINPID > $OUT/stop; kill $MAINPID'
        RuntimeDirectory=app
        RuntimeDirectoryMode=0710
        """,
    )
    inst = run_units(ikosd_factory, f'[executables.app]\nunit = "{unit}"\n')
    pid = inst.wait_state("app", "running", timeout=30)["pid"]
    # the pre command ran before, the post command before ready (it knew the main pid)
    assert (out / "pre").read_text() == "pre\n"
    assert (out / "post").read_text() == f"{pid}\n"
    assert (out / "args").read_text() == "ikos --one --two a b\n"
    run = inst.root / "run" / "app"
    assert stat.S_IMODE(run.stat().st_mode) == 0o710
    inst.ctl("reload", "app", check=True)
    inst.ctl("reload", "app", check=True)
    assert (out / "reloads").read_text() == f"reload {pid}\nreload {pid}\n"
    assert inst.status("app")["pid"] == pid
    inst.ctl("stop", "app", check=True)
    st = inst.wait_state("app", "stopped")
    assert (out / "stop").read_text() == f"stop {pid}\n"
    assert st["last_exit"]["signal"] == signal.SIGTERM  # from ExecStop='s kill


def test_a_failing_start_pre_command_fails_the_start(ikosd_factory: Any, tmp_path: Path) -> None:
    unit = write_unit(
        tmp_path,
        "bad.service",
        "[Service]\nExecStartPre=/bin/sh -c 'echo checking; exit 3'\nExecStart=/bin/sleep 100\n",
    )
    inst = run_units(ikosd_factory, f'[executables.bad]\nunit = "{unit}"\nrestart_on = "always"\n')
    wait_for(
        lambda: "exec_start_pre" in inst.log_text() and "exited with status 3" in inst.log_text(),
        30,
        message="the failed ExecStartPre= in the log",
    )
    assert inst.status("bad")["state"] != "running"
    log_file = inst.root / "var" / "log" / "ikos" / "bad.log"
    wait_for(lambda: log_file.exists() and "checking" in log_file.read_text(), 10)


def test_a_reload_of_a_unit_without_exec_reload_is_refused(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    unit = write_unit(tmp_path, "plain.service", "[Service]\nExecStart=/bin/sleep 1000\n")
    inst = run_units(ikosd_factory, f'[executables.plain]\nunit = "{unit}"\n')
    pid = inst.wait_state("plain", "running", timeout=30)["pid"]
    res = inst.ctl("reload", "plain")
    assert res.returncode != 0 and "its unit has no ExecReload=" in res.stderr
    assert inst.status("plain")["pid"] == pid
    os.kill(pid, signal.SIGKILL)  # Restart= absent: systemd's "no", the daemon stays down
    st = inst.wait_state("plain", "failed", timeout=30)
    assert st["restarts"] == 0


def test_ikosd_refuses_a_bad_unit_at_start(ikosd_factory: Any, tmp_path: Path) -> None:
    unit = write_unit(
        tmp_path, "nostart.service", "[Unit]\nDescription=x\n[Service]\nType=simple\n"
    )
    inst = ikosd_factory(
        config=f'[executables.x]\nunit = "{unit}"\n', wait_ready=False, expect_exit=2
    )
    wait_for(lambda: inst.proc.poll() is not None, 60, message="ikosd to exit")
    assert (
        f"[executables.x] key 'unit': expected a unit ikos can run ({unit}: ExecStart= missing"
        in inst.log_text()
    )
