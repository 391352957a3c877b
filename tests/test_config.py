"""Tests of the ikos.toml loader (ikos.manager._config): trees, settings, errors, warnings."""

from __future__ import annotations

import math
import pickle
import re
import resource
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ikos._errors import ConfigError, SpecError
from ikos.manager._config import (
    AUTO_METRICS,
    LoadedConfig,
    ManagerSettings,
    load_config,
    read_declarations,
)
from ikos.platform._spawn import ResourceLimits
from ikos.registry._health import HealthCheck
from ikos.registry._service import ServiceInfo
from ikos.supervision._spec import EXEC_FIELDS, RESTART_TYPES, Backoff, Child, Exec, Supervisor

TESTS = Path(__file__).parent
ECHO = "config_actors:Echo"
DB = "config_actors:Db"


@pytest.fixture(scope="module", autouse=True)
def _actors_importable() -> Iterator[None]:
    """Make ``config_actors`` importable whatever pytest's import mode."""
    added = str(TESTS) not in sys.path
    if added:
        sys.path.insert(0, str(TESTS))
    yield
    if added:
        sys.path.remove(str(TESTS))


def write(directory: Path, text: str, name: str = "ikos.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(directory: Path, text: str, base_tree: Supervisor | None = None) -> LoadedConfig:
    return load_config(write(directory, text), base_tree)


def names(sup: Supervisor) -> list[str]:
    return [child.name for child in sup.children]


# --- valid files ---------------------------------------------------------------------------

FULL = f"""
[ikosd]
metrics = "0.0.0.0:9100"
log_level = "warning"
shutdown_timeout = 12
mailbox_size = 50
max_message_bytes = 1048576

[root]
name = "system"
strategy = "one_for_all"
max_restarts = 3
within = 7
description = "the whole system"

[actors.db]
class = "{DB}"
restart = "permanent"
shutdown = "brutal_kill"

[supervisors.workers]
strategy = "rest_for_one"
max_restarts = 5
within = 10
restart = "transient"
shutdown = 20
requires = ["db"]
after = []
description = "the workers"
backoff = {{ min = 0.5, max = 8, random_factor = 0.1, reset_after = 5 }}

[actors.echo]
class = "{ECHO}"
supervisor = "workers"
restart = "temporary"
shutdown = 2.5
args = [1, "two"]
kwargs = {{ greeting = "hi", times = 3 }}
requires = ["db"]
after = ["web"]
mailbox_size = 10
start_timeout = 4
description = "says it back"
backoff = {{ min = 0.1, max = 10 }}

[executables.web]
executable = "/usr/sbin/nginx"
supervisor = "workers"
restart = "transient"
shutdown = "infinity"
requires = ["db"]
description = "front end"
start_timeout = 9
args = ["-g", "daemon off;"]
environment = {{ LANG = "C.UTF-8" }}
working_directory = "/srv/www"
pid_file = "/run/nginx.pid"
user = "www-data"
group = "www-data"
auto_start = true
auto_restart = false
restart_delay = 1.5
max_restarts = 4
umask = "027"
stdin = "null"
stdout = "log"
stderr = "append:/var/log/nginx.err"
reload_signal = "HUP"
type = "forking"
limits.nofile = [1024, 4096]
limits.core = 0
limits.as = "infinity"
limits.memory_max = "512M"
limits.cpu_quota = "150%"
limits.tasks_max = 64
"""


def expected_full_tree() -> Supervisor:
    echo = Child(
        "echo",
        ECHO,
        restart="temporary",
        shutdown=2.5,
        args=(1, "two"),
        kwargs={"greeting": "hi", "times": 3},
        requires=["db"],
        after=["web"],
        mailbox_size=10,
        start_timeout=4.0,
        description="says it back",
        backoff=Backoff(min=0.1, max=10.0),
    )
    web = Exec(
        "web",
        "/usr/sbin/nginx",
        restart="transient",
        shutdown="infinity",
        requires=["db"],
        description="front end",
        start_timeout=9.0,
        args=("-g", "daemon off;"),
        environment={"LANG": "C.UTF-8"},
        working_directory="/srv/www",
        pid_file="/run/nginx.pid",
        user="www-data",
        group="www-data",
        auto_start=True,
        auto_restart=False,
        restart_delay=1.5,
        max_restarts=4,
        umask=0o027,
        stdin="null",
        stdout="log",
        stderr="append:/var/log/nginx.err",
        reload_signal="SIGHUP",
        type="forking",
        limits={
            "nofile": (1024, 4096),
            "core": 0,
            "as_": resource.RLIM_INFINITY,
            "memory_max": 512 * 1024 * 1024,
            "cpu_quota": 1.5,
            "tasks_max": 64,
        },
    )
    workers = Supervisor(
        "workers",
        "rest_for_one",
        5,
        10.0,
        [echo, web],
        restart="transient",
        shutdown=20.0,
        requires=["db"],
        description="the workers",
        backoff=Backoff(min=0.5, max=8.0, random_factor=0.1, reset_after=5.0),
    )
    db = Child("db", DB, shutdown="brutal_kill", mailbox_size=50)
    return Supervisor(
        "system", "one_for_all", 3, 7.0, [db, workers], description="the whole system"
    )


def test_full_file_round_trips_into_the_expected_tree(tmp_path: Path) -> None:
    loaded = load(tmp_path, FULL)
    assert loaded.tree == expected_full_tree()
    assert loaded.settings == ManagerSettings(
        metrics=("0.0.0.0", 9100),
        log_level="warning",
        shutdown_timeout=12.0,
        mailbox_size=50,
        max_message_bytes=1048576,
    )
    assert loaded.warnings == ()
    assert loaded.file == tmp_path / "ikos.toml"
    assert loaded.file.is_absolute()


def test_empty_file_gives_an_empty_default_root_and_default_settings(tmp_path: Path) -> None:
    loaded = load(tmp_path, "")
    assert loaded.tree == Supervisor("root", "one_for_one", 1, 5.0)
    assert loaded.settings == ManagerSettings()
    assert loaded.settings.metrics == AUTO_METRICS  # ikosd decides, per instance
    assert loaded.settings.max_message_bytes == 64 * 1024 * 1024
    assert loaded.warnings == ()


def test_defaults_of_each_kind_of_entry(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        f"""
        [supervisors.s]
        [actors.a]
        class = "{ECHO}"
        [executables.e]
        executable = "sleep"
        """,
    )
    assert loaded.tree.children == (
        Supervisor("s", "one_for_one", 1, 5.0),
        Child("a", ECHO),
        Exec("e", "sleep"),
    )


def test_ikosd_mailbox_size_is_the_default_of_actors(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        f"""
        [ikosd]
        mailbox_size = 7
        [actors.a]
        class = "{ECHO}"
        [actors.b]
        class = "{ECHO}"
        mailbox_size = 3
        """,
    )
    assert [c.mailbox_size for c in loaded.tree.children if isinstance(c, Child)] == [7, 3]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("false", None),
        ("true", AUTO_METRICS),
        ('"localhost:0"', ("localhost", 0)),
        ('"[::1]:9464"', ("::1", 9464)),
    ],
)
def test_metrics_address(tmp_path: Path, value: str, expected: object) -> None:
    loaded = load(tmp_path, f"[ikosd]\nmetrics = {value}\n")
    assert loaded.settings.metrics == expected


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    assert load(tmp_path, '[ikosd]\nlog_level = "DEBUG"\n').settings.log_level == "debug"


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"022"', 0o22), ('"0o077"', 0o77), ("18", 18), ("0", 0)],
)
def test_umask_forms(tmp_path: Path, value: str, expected: int) -> None:
    loaded = load(tmp_path, f'[executables.e]\nexecutable = "true"\numask = {value}\n')
    exe = loaded.tree.children[0]
    assert isinstance(exe, Exec)
    assert exe.fields["umask"] == expected


def test_reload_signal_forms(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        [executables.a]
        executable = "true"
        reload_signal = "usr1"
        [executables.b]
        executable = "true"
        reload_signal = 10
        """,
    )
    # Normalised to the signal itself, however it was written.
    a, b = (c for c in loaded.tree.children if isinstance(c, Exec))
    assert a.options.reload_signal is signal.SIGUSR1 is b.options.reload_signal
    assert a == Exec("a", "true", reload_signal="SIGUSR1")


# --- start order ---------------------------------------------------------------------------


def test_children_of_different_kinds_interleave_in_file_order(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        f"""
        [executables.first]
        executable = "true"

        [actors.second]
        class = "{ECHO}"

        [supervisors.third]

        [ actors . "fourth.one" ]   # spaces and a quoted name
        class = "{ECHO}"

        [executables.fifth]
        executable = "true"

        [actors.sixth.kwargs]       # a sub-table defines the entry too
        x = 1

        [actors.sixth]
        class = "{ECHO}"

        [actors]
        seventh = {{ class = "{ECHO}" }}
        eighth.class = "{ECHO}"

        [supervisors.ninth]
        """,
    )
    assert names(loaded.tree) == [
        "first",
        "second",
        "third",
        "fourth.one",
        "fifth",
        "sixth",
        "seventh",
        "eighth",
        "ninth",
    ]


def test_order_within_a_nested_supervisor_follows_the_file(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        f"""
        [actors.b]
        class = "{ECHO}"
        supervisor = "s"
        [supervisors.s]
        [executables.a]
        executable = "true"
        supervisor = "s"
        [supervisors.t]
        parent = "s"
        """,
    )
    (sup,) = loaded.tree.children
    assert isinstance(sup, Supervisor)
    assert names(sup) == ["b", "a", "t"]


# --- errors --------------------------------------------------------------------------------

ERRORS: list[tuple[str, str, str | None, str | None, str]] = [
    # (id, file text, table, key, expected text)
    (
        "restart",
        f'[actors.echo]\nclass = "{ECHO}"\nrestart = "forever"\n',
        "actors.echo",
        "restart",
        "one of permanent, transient, temporary",
    ),
    (
        "shutdown-word",
        f'[actors.echo]\nclass = "{ECHO}"\nshutdown = "soon"\n',
        "actors.echo",
        "shutdown",
        "seconds >= 0, 'brutal_kill' or 'infinity'",
    ),
    (
        "shutdown-negative",
        '[executables.web]\nexecutable = "true"\nshutdown = -1\n',
        "executables.web",
        "shutdown",
        "seconds >= 0",
    ),
    (
        "max-restarts-negative",
        "[supervisors.w]\nmax_restarts = -1\n",
        "supervisors.w",
        "max_restarts",
        "an integer >= 0",
    ),
    (
        "max-restarts-bool",
        "[supervisors.w]\nmax_restarts = true\n",
        "supervisors.w",
        "max_restarts",
        "an integer >= 0",
    ),
    (
        "max-restarts-float",
        "[root]\nmax_restarts = 2.5\n",
        "root",
        "max_restarts",
        "an integer >= 0",
    ),
    ("within-string", '[supervisors.w]\nwithin = "10"\n', "supervisors.w", "within", "seconds > 0"),
    ("within-zero", "[root]\nwithin = 0\n", "root", "within", "seconds > 0"),
    (
        "strategy",
        '[supervisors.w]\nstrategy = "all_for_one"\n',
        "supervisors.w",
        "strategy",
        "one of one_for_one, one_for_all, rest_for_one, simple_one_for_one",
    ),
    ("root-strategy", '[root]\nstrategy = "x"\n', "root", "strategy", "one of one_for_one"),
    (
        "root-name",
        '[root]\nname = "has space"\n',
        "root",
        None,
        "a name of 1-64 characters",
    ),
    (
        "unknown-supervisor",
        f'[actors.echo]\nclass = "{ECHO}"\nsupervisor = "nope"\n',
        "actors.echo",
        "supervisor",
        "the name of a supervisor: one of root",
    ),
    (
        "unknown-parent",
        '[supervisors.w]\nparent = "nope"\n',
        "supervisors.w",
        "parent",
        "the name of a supervisor",
    ),
    (
        "parent-is-an-actor",
        f'[actors.db]\nclass = "{DB}"\n[supervisors.w]\nparent = "db"\n',
        "supervisors.w",
        "parent",
        "the name of a supervisor ('db' is an actor)",
    ),
    (
        "parent-not-a-string",
        "[supervisors.w]\nparent = 3\n",
        "supervisors.w",
        "parent",
        "the name of a supervisor",
    ),
    (
        "cycle",
        '[supervisors.a]\nparent = "b"\n[supervisors.b]\nparent = "c"\n'
        '[supervisors.c]\nparent = "a"\n',
        "supervisors.a",
        "parent",
        "not a cycle (a -> b -> c -> a)",
    ),
    (
        "self-parent",
        '[supervisors.a]\nparent = "a"\n',
        "supervisors.a",
        "parent",
        "not a cycle (a -> a)",
    ),
    (
        "duplicate-across-kinds",
        f'[actors.x]\nclass = "{ECHO}"\n[executables.x]\nexecutable = "true"\n',
        "executables.x",
        None,
        "a name not used elsewhere in the tree (also [actors.x])",
    ),
    (
        "duplicate-supervisor-first",
        f'[supervisors.x]\n[actors.x]\nclass = "{ECHO}"\n',
        "actors.x",
        None,
        "(also [supervisors.x])",
    ),
    (
        "duplicate-of-root",
        '[executables.root]\nexecutable = "true"\n',
        "executables.root",
        None,
        "(also the root supervisor)",
    ),
    (
        "bad-name",
        f'[actors."bad name"]\nclass = "{ECHO}"\n',
        'actors."bad name"',
        None,
        "a name of 1-64 characters",
    ),
    ("class-missing", "[actors.echo]\n", "actors.echo", "class", "(the key is required)"),
    (
        "class-not-a-string",
        "[actors.echo]\nclass = 1\n",
        "actors.echo",
        "class",
        "an import path 'package.module:Class'",
    ),
    (
        "class-unimportable",
        '[actors.echo]\nclass = "nowhere_at_all.missing:Echo"\n',
        "actors.echo",
        "class",
        "an importable ikos.Actor subclass",
    ),
    (
        "class-without-colon",
        '[actors.echo]\nclass = "config_actors.Echo"\n',
        "actors.echo",
        "class",
        "an importable ikos.Actor subclass",
    ),
    (
        "class-not-an-actor",
        '[actors.echo]\nclass = "config_actors:NotAnActor"\n',
        "actors.echo",
        "class",
        "a subclass of ikos.Actor",
    ),
    (
        "requires-unknown",
        f'[actors.echo]\nclass = "{ECHO}"\nrequires = ["db"]\n',
        "actors.echo",
        "requires",
        "the name of a child in the tree",
    ),
    (
        "requires-not-a-list",
        f'[actors.echo]\nclass = "{ECHO}"\nrequires = "db"\n',
        "actors.echo",
        "requires",
        "a list of names",
    ),
    (
        "after-itself",
        f'[actors.echo]\nclass = "{ECHO}"\nafter = ["echo"]\n',
        "actors.echo",
        "after",
        "names other than the child itself",
    ),
    (
        "mailbox-zero",
        f'[actors.echo]\nclass = "{ECHO}"\nmailbox_size = 0\n',
        "actors.echo",
        "mailbox_size",
        "an integer >= 1",
    ),
    (
        "mailbox-float",
        f'[actors.echo]\nclass = "{ECHO}"\nmailbox_size = 1.5\n',
        "actors.echo",
        "mailbox_size",
        "an integer >= 1",
    ),
    (
        "start-timeout-zero",
        f'[actors.echo]\nclass = "{ECHO}"\nstart_timeout = 0\n',
        "actors.echo",
        "start_timeout",
        "seconds > 0",
    ),
    (
        "args-not-a-list",
        f'[actors.echo]\nclass = "{ECHO}"\nargs = "x"\n',
        "actors.echo",
        "args",
        "a list of positional arguments",
    ),
    (
        "kwargs-not-a-table",
        f'[actors.echo]\nclass = "{ECHO}"\nkwargs = [1]\n',
        "actors.echo",
        "kwargs",
        "a table of keyword arguments",
    ),
    (
        "description-not-a-string",
        "[supervisors.w]\ndescription = 5\n",
        "supervisors.w",
        "description",
        "a string",
    ),
    (
        "backoff-min-zero",
        f'[actors.echo]\nclass = "{ECHO}"\nbackoff = {{ min = 0 }}\n',
        "actors.echo",
        "backoff.min",
        "seconds > 0",
    ),
    (
        "backoff-max-below-min",
        "[supervisors.w]\nbackoff = { min = 5, max = 1 }\n",
        "supervisors.w",
        "backoff.max",
        "seconds >= backoff.min",
    ),
    (
        "backoff-not-a-table",
        '[executables.e]\nexecutable = "true"\nbackoff = 3\n',
        "executables.e",
        "backoff",
        "a table like { min = 0.1, max = 10 }",
    ),
    (
        "backoff-min-string",
        '[executables.e]\nexecutable = "true"\nbackoff = { min = "fast" }\n',
        "executables.e",
        "backoff.min",
        "a number of seconds",
    ),
    (
        "simple-one-for-one-two-children",
        f'[supervisors.pool]\nstrategy = "simple_one_for_one"\n'
        f'[actors.a]\nclass = "{ECHO}"\nsupervisor = "pool"\n'
        f'[actors.b]\nclass = "{ECHO}"\nsupervisor = "pool"\n',
        "supervisors.pool",
        "strategy",
        "exactly one template Child or Exec for simple_one_for_one",
    ),
    (
        "executable-missing",
        "[executables.e]\nargs = []\n",
        "executables.e",
        "executable",
        "(the key is required)",
    ),
    (
        "exec-args",
        '[executables.e]\nexecutable = "true"\nargs = ["a", true]\n',
        "executables.e",
        "args",
        "a list of strings",
    ),
    (
        "exec-environment-value",
        '[executables.e]\nexecutable = "true"\nenvironment = { A = true }\n',
        "executables.e",
        "environment.A",
        "a string",
    ),
    (
        "exec-environment-not-a-table",
        '[executables.e]\nexecutable = "true"\nenvironment = ["A=1"]\n',
        "executables.e",
        "environment",
        "a table of strings",
    ),
    (
        "exec-working-directory",
        '[executables.e]\nexecutable = "true"\nworking_directory = 1\n',
        "executables.e",
        "working_directory",
        "a non-empty string",
    ),
    (
        "exec-user",
        '[executables.e]\nexecutable = "true"\nuser = true\n',
        "executables.e",
        "user",
        "a user name or uid",
    ),
    (
        "exec-auto-start",
        '[executables.e]\nexecutable = "true"\nauto_start = "yes"\n',
        "executables.e",
        "auto_start",
        "true or false",
    ),
    (
        "exec-restart-delay",
        '[executables.e]\nexecutable = "true"\nrestart_delay = -0.5\n',
        "executables.e",
        "restart_delay",
        "seconds >= 0",
    ),
    (
        "exec-max-restarts",
        '[executables.e]\nexecutable = "true"\nmax_restarts = -1\n',
        "executables.e",
        "max_restarts",
        "an integer >= 0",
    ),
    (
        "exec-umask-digits",
        '[executables.e]\nexecutable = "true"\numask = "089"\n',
        "executables.e",
        "umask",
        "an octal string like '022'",
    ),
    (
        "exec-umask-range",
        '[executables.e]\nexecutable = "true"\numask = 1024\n',
        "executables.e",
        "umask",
        "an integer from 0 to 0o777",
    ),
    (
        "exec-stdout",
        '[executables.e]\nexecutable = "true"\nstdout = "syslog"\n',
        "executables.e",
        "stdout",
        "'null', 'inherit', 'log', 'file:PATH' or 'append:PATH'",
    ),
    (
        "exec-stderr-empty-path",
        '[executables.e]\nexecutable = "true"\nstderr = "file:"\n',
        "executables.e",
        "stderr",
        "'file:PATH'",
    ),
    (
        "exec-stdin-log",
        '[executables.e]\nexecutable = "true"\nstdin = "log"\n',
        "executables.e",
        "stdin",
        "'null', 'inherit' or 'file:PATH'",
    ),
    (
        "exec-type",
        '[executables.e]\nexecutable = "true"\ntype = "daemon"\n',
        "executables.e",
        "type",
        "one of simple, exec, forking, notify, oneshot",
    ),
    (
        "exec-reload-signal",
        '[executables.e]\nexecutable = "true"\nreload_signal = "SIGFOO"\n',
        "executables.e",
        "reload_signal",
        "a signal name like 'SIGHUP'",
    ),
    (
        "exec-limits-not-a-table",
        '[executables.e]\nexecutable = "true"\nlimits = 5\n',
        "executables.e",
        "limits",
        "a table like { nofile = 1024, core = 0 }",
    ),
    (
        "exec-limit-negative",
        '[executables.e]\nexecutable = "true"\nlimits = { nofile = -2 }\n',
        "executables.e",
        "limits.nofile",
        "an integer >= 0, 'infinity', or [soft, hard]",
    ),
    (
        "exec-limit-soft-above-hard",
        '[executables.e]\nexecutable = "true"\nlimits = { nproc = [10, 5] }\n',
        "executables.e",
        "limits.nproc",
        "[soft, hard] with soft <= hard",
    ),
    (
        "exec-limit-triple",
        '[executables.e]\nexecutable = "true"\nlimits = { cpu = [1, 2, 3] }\n',
        "executables.e",
        "limits.cpu",
        "[soft, hard]",
    ),
    (
        "exec-memory-max",
        '[executables.e]\nexecutable = "true"\nlimits = { memory_max = "lots" }\n',
        "executables.e",
        "limits.memory_max",
        "a size like '512M'",
    ),
    (
        "exec-cpu-quota",
        '[executables.e]\nexecutable = "true"\nlimits = { cpu_quota = 0 }\n',
        "executables.e",
        "limits.cpu_quota",
        "CPUs > 0",
    ),
    (
        "exec-tasks-max",
        '[executables.e]\nexecutable = "true"\nlimits = { tasks_max = true }\n',
        "executables.e",
        "limits.tasks_max",
        "an integer >= 1",
    ),
    (
        "exec-start-timeout",
        '[executables.e]\nexecutable = "true"\nstart_timeout = "30s"\n',
        "executables.e",
        "start_timeout",
        "seconds > 0",
    ),
    (
        "metrics-word",
        '[ikosd]\nmetrics = "nope"\n',
        "ikosd",
        "metrics",
        "'HOST:PORT' (port 0-65535) or false to disable",
    ),
    ("metrics-port-only", "[ikosd]\nmetrics = 9464\n", "ikosd", "metrics", "'HOST:PORT'"),
    ("metrics-port-range", '[ikosd]\nmetrics = "h:70000"\n', "ikosd", "metrics", "'HOST:PORT'"),
    (
        "log-level",
        '[ikosd]\nlog_level = "loud"\n',
        "ikosd",
        "log_level",
        "one of debug, info, warning, error, critical",
    ),
    (
        "shutdown-timeout",
        "[ikosd]\nshutdown_timeout = 0\n",
        "ikosd",
        "shutdown_timeout",
        "seconds > 0",
    ),
    (
        "max-message-bytes",
        '[ikosd]\nmax_message_bytes = "64M"\n',
        "ikosd",
        "max_message_bytes",
        "an integer >= 1",
    ),
    ("ikosd-not-a-table", "ikosd = 3\n", None, "ikosd", "a table [ikosd]"),
    ("actors-not-a-table", "actors = 3\n", None, "actors", "tables [actors.NAME]"),
    ("entry-not-a-table", "[actors]\necho = 3\n", "actors", "echo", "a table [actors.echo]"),
]


@pytest.mark.parametrize(
    ("text", "table", "key", "expected"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_bad_entry_is_an_error_naming_file_table_key_and_expectation(
    tmp_path: Path, text: str, table: str | None, key: str | None, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert not isinstance(err, SpecError)  # always mapped back to the file
    assert (err.file, err.table, err.key) == (str(path), table, key)
    message = str(err)
    assert str(path) in message
    if table is not None:
        assert f"[{table}]" in message
    if key is not None:
        assert f"key '{key}'" in message
    assert expected in message


def test_error_example_from_the_brief_reads_well(tmp_path: Path) -> None:
    path = write(tmp_path, f'[actors.echo]\nclass = "{ECHO}"\nrestart = "forever"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path} [actors.echo] key 'restart': "
        "expected one of permanent, transient, temporary, got 'forever'"
    )
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value)


def test_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[ikosd]\nlog_level = "info"\n\n[actors.echo]\nclass = = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "valid TOML syntax" in message
    assert "line 5, column" in message
    assert info.value.table == "actors.echo"


def test_duplicate_table_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, f'[actors.a]\nclass = "{ECHO}"\n[actors.a]\nclass = "{ECHO}"\n')
    with pytest.raises(ConfigError, match=r"line 3, column"):
        load_config(path)


def test_missing_file_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a readable configuration file") as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.file == str(tmp_path / "absent.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[root]\ndescription = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


# --- warnings ------------------------------------------------------------------------------


def test_unknown_keys_are_warnings_not_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        colour = "blue"

        [ikosd]
        metrix = "x"

        [root]
        restart = "permanent"

        [supervisors.w]
        stratgy = "one_for_all"
        backoff = {{ min = 1, mx = 3 }}

        [actors.echo]
        class = "{ECHO}"
        restat = "permanent"

        [executables.web]
        executable = "true"
        colour = "red"
        limits = {{ nofile = 10, nprocs = 3 }}

        [health.checks]
        interval = 5
        """,
    )
    loaded = load_config(path)
    f = str(path)
    assert loaded.warnings == (
        f"{f}: [ikosd] unknown key 'metrix' (ignored), did you mean 'metrics'?",
        f"{f}: unknown key 'colour' (ignored)",
        f"{f}: unknown table [health] (ignored)",
        f"{f}: [root] unknown key 'restart' (ignored)",
        f"{f}: [supervisors.w] unknown key 'stratgy' (ignored), did you mean 'strategy'?",
        f"{f}: [supervisors.w] unknown key 'backoff.mx' (ignored), did you mean 'backoff.max'?",
        f"{f}: [actors.echo] unknown key 'restat' (ignored), did you mean 'restart'?",
        f"{f}: [executables.web] unknown key 'colour' (ignored)",
        f"{f}: [executables.web] unknown key 'limits.nprocs' (ignored), "
        "did you mean 'limits.nproc'?",
    )
    sup, _echo, web = loaded.tree.children
    assert isinstance(sup, Supervisor) and sup.strategy == "one_for_one"
    assert sup.backoff == Backoff(min=1.0)
    assert isinstance(web, Exec)
    assert web.fields == {"limits": ResourceLimits(nofile=10)}  # unknown keys are not passed on
    assert loaded.settings.metrics == AUTO_METRICS


# --- merging with --tree -------------------------------------------------------------------


def python_tree() -> Supervisor:
    return Supervisor(
        "main",
        "one_for_one",
        2,
        3.0,
        [
            Child("py1", ECHO),
            Supervisor("pysub", children=[Child("py2", ECHO)]),
            Supervisor("pool", "simple_one_for_one", children=[Child("tmpl", ECHO)]),
        ],
    )


def test_file_entries_join_the_python_tree(tmp_path: Path) -> None:
    base = python_tree()
    loaded = load(
        tmp_path,
        f"""
        [actors.a]
        class = "{ECHO}"
        requires = ["py1"]

        [actors.b]
        class = "{ECHO}"
        supervisor = "pysub"

        [supervisors.fsub]
        parent = "pysub"

        [executables.e]
        executable = "true"
        supervisor = "fsub"
        """,
        base_tree=base,
    )
    tree = loaded.tree
    assert (tree.name, tree.strategy, tree.max_restarts, tree.within) == (
        "main",
        "one_for_one",
        2,
        3.0,
    )
    assert names(tree) == ["py1", "pysub", "pool", "a"]
    pysub = tree.children[1]
    assert isinstance(pysub, Supervisor)
    assert names(pysub) == ["py2", "b", "fsub"]
    fsub = pysub.children[2]
    assert isinstance(fsub, Supervisor)
    assert fsub.children == (Exec("e", "true"),)
    assert tree.children[2] is base.children[2]  # untouched specs are reused as they are
    assert base == python_tree()  # the Python tree itself is not changed


def test_python_tree_with_an_empty_file_is_itself(tmp_path: Path) -> None:
    base = python_tree()
    assert load(tmp_path, "", base_tree=base).tree is base


@pytest.mark.parametrize(
    ("text", "table", "key", "expected"),
    [
        ('[root]\nname = "root"\n', "root", None, "no [root] table: the --tree supervisor 'main'"),
        (
            f'[actors.py2]\nclass = "{ECHO}"\n',
            "actors.py2",
            None,
            "(also a child of the --tree supervisor)",
        ),
        (
            f'[actors.main]\nclass = "{ECHO}"\n',
            "actors.main",
            None,
            "(also the root supervisor)",
        ),
        (
            f'[actors.a]\nclass = "{ECHO}"\nsupervisor = "py1"\n',
            "actors.a",
            "supervisor",
            "the name of a supervisor: one of main, pysub, pool",
        ),
        (
            f'[actors.a]\nclass = "{ECHO}"\nsupervisor = "root"\n',
            "actors.a",
            "supervisor",
            "the name of a supervisor",
        ),
        (
            f'[actors.a]\nclass = "{ECHO}"\nsupervisor = "pool"\n',
            "actors.a",
            "supervisor",
            "a supervisor that accepts it (main/pool: exactly one template",
        ),
        (
            f'[actors.a]\nclass = "{ECHO}"\nrequires = ["nope"]\n',
            "actors.a",
            "requires",
            "the name of a child in the tree",
        ),
    ],
)
def test_merge_errors(
    tmp_path: Path, text: str, table: str, key: str | None, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, python_tree())
    err = info.value
    assert (err.file, err.table, err.key) == (str(path), table, key)
    assert expected in str(err)


def test_file_entries_may_require_python_children(tmp_path: Path) -> None:
    loaded = load(
        tmp_path, f'[actors.a]\nclass = "{ECHO}"\nafter = ["py2", "tmpl"]\n', python_tree()
    )
    assert loaded.tree.children[-1] == Child("a", ECHO, after=["py2", "tmpl"])


def test_an_invalid_python_tree_is_reported_as_such(tmp_path: Path) -> None:
    bad = Supervisor("main", children=[Child("x", ECHO), Child("x", ECHO)])
    with pytest.raises(SpecError, match="main/x"):
        load(tmp_path, "", base_tree=bad)


# --- property tests ------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """Encode a str, bool, int or float as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        out = []
        for ch in value:
            if " " <= ch <= "~" and ch not in '"\\':
                out.append(ch)
            else:
                out.append(f"\\U{ord(ch):08X}")
        return '"' + "".join(out) + '"'
    return repr(value)


VALUES = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config")


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(st.sampled_from(RESTART_TYPES), VALUES))
def test_restart_values(scratch: Path, value: Any) -> None:
    path = write(scratch, f'[actors.a]\nclass = "{ECHO}"\nrestart = {toml_value(value)}\n')
    if value in RESTART_TYPES and isinstance(value, str):
        child = load_config(path).tree.children[0]
        assert isinstance(child, Child) and child.restart == value
    else:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert (info.value.table, info.value.key) == ("actors.a", "restart")
        assert "one of permanent, transient, temporary" in str(info.value)


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(st.sampled_from(["brutal_kill", "infinity"]), VALUES))
def test_shutdown_values(scratch: Path, value: Any) -> None:
    path = write(scratch, f'[executables.e]\nexecutable = "true"\nshutdown = {toml_value(value)}\n')
    valid_number = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
    if value in ("brutal_kill", "infinity") or valid_number:
        child = load_config(path).tree.children[0]
        assert isinstance(child, Exec)
        assert child.shutdown == (value if isinstance(value, str) else float(value))
    else:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert (info.value.table, info.value.key) == ("executables.e", "shutdown")
        assert "seconds >= 0, 'brutal_kill' or 'infinity'" in str(info.value)


@settings(max_examples=100, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["actors", "executables", "supervisors"]), max_size=8),
)
def test_any_interleaving_keeps_file_order(scratch: Path, kinds: list[str]) -> None:
    body = {
        "actors": f'class = "{ECHO}"\n',
        "executables": 'executable = "true"\n',
        "supervisors": "",
    }
    text = "".join(f"[{kind}.n{i}]\n{body[kind]}\n" for i, kind in enumerate(kinds))
    loaded = load_config(write(scratch, text))
    assert names(loaded.tree) == [f"n{i}" for i in range(len(kinds))]


# --- the documentation ---------------------------------------------------------------------


def test_the_documented_full_example_loads_without_warnings(tmp_path: Path) -> None:
    doc = (TESTS.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = re.search(r"<!-- full-example -->\s*```toml\n(.*?)```", doc, re.DOTALL)
    assert example, "docs/configuration.md lost its marked full example"
    # The example names the demo's classes; check it against the test actors instead.
    text = re.sub(r'^class = "[^"]*"', f'class = "{ECHO}"', example.group(1), flags=re.M)
    loaded = load(tmp_path, text)
    assert loaded.warnings == ()
    walked = [path for path, _ in loaded.tree.walk()]
    assert walked == ["root", "root/db", "root/workers", "root/workers/echo", "root/workers/web"]


# --- service metadata and health checks ----------------------------------------------------

DECLARING = f"""
[actors.net]
class = "{ECHO}"
description = "the network"
[[actors.net.service]]
type = "dhcp"
version = "4.4"
endpoint = "udp://0.0.0.0:67"
capabilities = ["dhcpv4", "dhcpv6"]
metadata = {{ region = "eu" }}
[[actors.net.service]]
name = "net/dns"
[[actors.net.health]]
kind = "method"
target = "healthy"
interval = 1
[[actors.net.health]]
kind = "tcp"
target = "127.0.0.1:53"
timeout = 0.5
unhealthy_threshold = 2
on_failure = "restart"

[executables.web]
executable = "true"
service = {{ name = "web/http", capabilities = ["http"] }}
[executables.web.health]
kind = "http"
target = "http://127.0.0.1:8080/health"

[executables.hb]
executable = "true"
health = [{{ kind = "ttl", ttl = 5 }}, {{ kind = "exec", target = "pgrep -x hb" }}]
"""


def test_services_and_health_checks_are_read_per_daemon(tmp_path: Path) -> None:
    loaded = load(tmp_path, DECLARING)
    assert loaded.warnings == ()
    assert names(loaded.tree) == ["net", "web", "hb"]
    assert loaded.services == {
        "net": (
            ServiceInfo(
                "net",
                description="the network",
                version="4.4",
                type="dhcp",
                endpoint="udp://0.0.0.0:67",
                capabilities=("dhcpv4", "dhcpv6"),
                owner="net",
                metadata={"region": "eu"},
            ),
            ServiceInfo("net/dns", description="the network", owner="net"),
        ),
        "web": (ServiceInfo("web/http", capabilities=("http",), owner="web"),),
    }
    assert loaded.health == {
        "net": (
            HealthCheck("method", "healthy", interval=1.0),
            HealthCheck(
                "tcp", "127.0.0.1:53", timeout=0.5, unhealthy_threshold=2, on_failure="restart"
            ),
        ),
        "web": (HealthCheck("http", "http://127.0.0.1:8080/health"),),
        "hb": (HealthCheck("ttl", ttl=5.0), HealthCheck("exec", ("pgrep", "-x", "hb"))),
    }
    declared = read_declarations(tmp_path / "ikos.toml")
    assert (declared.services, declared.health) == (loaded.services, loaded.health)


def test_a_file_without_declarations_declares_nothing(tmp_path: Path) -> None:
    loaded = load(tmp_path, f'[actors.a]\nclass = "{ECHO}"\n')
    assert (loaded.services, loaded.health) == ({}, {})


def test_health_tables_place_their_entry_in_the_start_order(tmp_path: Path) -> None:
    text = f"""
        [[executables.b.health]]
        kind = "ttl"
        ttl = 1
        [actors.a]
        class = "{ECHO}"
        [executables.b]
        executable = "true"
    """
    assert names(load(tmp_path, text).tree) == ["b", "a"]


@pytest.mark.parametrize(
    ("text", "table", "key", "fragment"),
    [
        (
            '[executables.x.service]\nname = "bad name"\n',
            "executables.x.service",
            "name",
            "expected a name of 1-128 characters",
        ),
        (
            "[executables.x.service]\ncapabilities = [1]\n",
            "executables.x.service",
            "capabilities",
            "expected a list of strings",
        ),
        (
            '[executables.x.service]\ncapabilities = ["a", "a"]\n',
            "executables.x.service",
            "capabilities",
            "item 1: duplicate 'a'",
        ),
        (
            "[executables.x.service]\nmetadata = { k = 1 }\n",
            "executables.x.service",
            "metadata.k",
            "expected a string",
        ),
        (
            f'[executables.x.service]\nmetadata = {{ k = "{"v" * 5000}" }}\n',
            "executables.x.service",
            "metadata",
            "limit of 4096 bytes",
        ),
        (
            '[executables.x.service]\ndescription = "x"\nversion = 2\n',
            "executables.x.service",
            "version",
            "expected a string",
        ),
        ("service = 3\n", "executables.x", "service", "an array of tables"),
        (
            '[executables.x.health]\nkind = "method"\ntarget = "ok"\n',
            "executables.x.health",
            "kind",
            "exec, tcp, http or ttl (a method check asks an actor)",
        ),
        (
            '[executables.x.health]\nkind = "magic"\n',
            "executables.x.health",
            "kind",
            "one of exec, tcp, http, ttl, method",
        ),
        (
            '[[executables.x.health]]\nkind = "ttl"\nttl = 1\n'
            '[[executables.x.health]]\nkind = "tcp"\ntarget = "nohost"\n',
            "executables.x.health[1]",
            "target",
            "an address 'host:port'",
        ),
        (
            '[executables.x.health]\nkind = "ttl"\n',
            "executables.x.health",
            "ttl",
            "required for kind ttl",
        ),
        (
            '[executables.x.health]\nkind = "exec"\ntarget = "true"\ninterval = 0\n',
            "executables.x.health",
            "interval",
            "a positive number of seconds",
        ),
        (
            '[executables.x.health]\nkind = "http"\ntarget = "ftp://h/"\n',
            "executables.x.health",
            "target",
            "an http:// or https:// URL",
        ),
        (
            '[executables.x.health]\nkind = "ttl"\nttl = 1\non_failure = "pray"\n',
            "executables.x.health",
            "on_failure",
            "one of restart, alert",
        ),
    ],
)
def test_bad_service_and_health_tables_name_file_table_and_key(
    tmp_path: Path, text: str, table: str, key: str, fragment: str
) -> None:
    path = write(tmp_path, '[executables.x]\nexecutable = "true"\n' + text)
    for reader in (load_config, read_declarations):
        with pytest.raises(ConfigError) as info:
            reader(path)
        assert (info.value.file, info.value.table, info.value.key) == (str(path), table, key)
        assert fragment in str(info.value)


def test_a_service_name_is_declared_once(tmp_path: Path) -> None:
    text = """
        [executables.a]
        executable = "true"
        service = { name = "shared" }
        [executables.b]
        executable = "true"
        service = { name = "shared" }
    """
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert (info.value.table, info.value.key) == ("executables.b.service", "name")
    assert "also [executables.a.service]" in str(info.value)


def test_unknown_keys_of_service_and_health_tables_are_warnings(tmp_path: Path) -> None:
    text = """
        [executables.a]
        executable = "true"
        [executables.a.service]
        versoin = "1"
        [executables.a.health]
        kind = "ttl"
        ttl = 1
        intreval = 2
    """
    loaded = load(tmp_path, text)
    file = tmp_path / "ikos.toml"
    assert loaded.warnings == (
        f"{file}: [executables.a.service] unknown key 'versoin' (ignored), did you mean 'version'?",
        f"{file}: [executables.a.health] unknown key 'intreval' (ignored),"
        " did you mean 'interval'?",
    )
    assert loaded.health["a"] == (HealthCheck("ttl", ttl=1.0),)


def test_every_executable_field_is_documented() -> None:
    docs = (TESTS.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = docs[docs.index("### `[executables.NAME]`") : docs.index("`limits` has one key")]
    rows = {
        name
        for line in section.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([a-z_][a-z0-9_]*)`", line.split("|")[1])
    }
    assert set(EXEC_FIELDS) <= rows, set(EXEC_FIELDS) - rows


def test_a_misspelt_executable_key_is_a_warning_with_a_suggestion(tmp_path: Path) -> None:
    loaded = load(tmp_path, '[executables.e]\nexecutable = "true"\nrestart_dealy = 3\n')
    assert loaded.warnings == (
        f"{tmp_path / 'ikos.toml'}: [executables.e] unknown key 'restart_dealy' (ignored), "
        "did you mean 'restart_delay'?",
    )
    assert loaded.tree.children == (Exec("e", "true"),)


def test_readers_names_an_existing_group(tmp_path: Path) -> None:
    """``[ikosd] readers``: a group name or gid, resolved; anything else names the key."""
    path = tmp_path / "ikos.toml"
    path.write_text('[ikosd]\nreaders = "root"\n')
    assert load_config(path).settings.readers == 0
    path.write_text("[ikosd]\nreaders = 0\n")
    assert load_config(path).settings.readers == 0
    path.write_text('[ikosd]\nreaders = "no-such-group-here"\n')
    with pytest.raises(ConfigError, match=r"\[ikosd\] key 'readers'"):
        load_config(path)
