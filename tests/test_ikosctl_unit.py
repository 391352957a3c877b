"""ikosctl's ``main`` against a scripted ikosd, and its renderers.

Each test runs ``main([...])`` in-process against :class:`ScriptedPeer` (a
real Unix-socket server in a thread, see ``test_control_client``) and checks
what a user or a script sees: the requests sent, stdout, the one stderr line
and the exit status.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ikos.cli._ikosctl import (
    PROTOCOL_VERBS,
    UNAVAILABLE_VERBS,
    build_parser,
    main,
    parse_data,
    parse_signal,
)
from ikos.cli._render import (
    LIST_COLUMNS,
    Style,
    humanize_duration,
    render_list,
    render_services,
    render_status,
    render_tree,
)
from ikos.platform._paths import InstancePaths

try:
    from test_control_client import (
        CLOSE,
        HANG,
        ScriptedPeer,
        deep_root,
        echo_args,
        events,
        fail,
        instance,
        ok,
        raw,
    )
except ImportError:  # tests/ made a package
    from tests.test_control_client import (
        CLOSE,
        HANG,
        ScriptedPeer,
        deep_root,
        echo_args,
        events,
        fail,
        instance,
        ok,
        raw,
    )

NOW = 1764134412.5


def status_of(name: str, state: str = "running", **fields: Any) -> dict[str, Any]:
    """A status object as docs/protocol.md describes it."""
    running = state == "running"
    status: dict[str, Any] = {
        "name": name,
        "kind": "actor",
        "state": state,
        "pid": 1234 if running else None,
        "restarts": 2,
        "started_at": NOW - 12 if running else None,
        "uptime_seconds": 12.0 if running else None,
        "supervisor": "root",
        "restart": "permanent",
        "target": "examples.demo:Echo",
        "last_exit": None,
        "description": "",
    }
    status.update(fields)
    return status


ROOT_STATUS = status_of(
    "root",
    kind="supervisor",
    pid=None,
    supervisor=None,
    strategy="one_for_one",
    max_restarts=3,
    within=5.0,
    children=["echo", "workers"],
)
TREE = {
    **ROOT_STATUS,
    "children": [
        {**status_of("echo"), "children": []},
        {
            **status_of(
                "workers", kind="supervisor", pid=None, strategy="rest_for_one", children=["w1"]
            ),
            "children": [status_of("w1", "backoff", kind="exec")],
        },
    ],
}


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("IKOS_ROOT", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    return tmp_path


@pytest.fixture
def peer(root: Path) -> Iterator[ScriptedPeer]:
    server = ScriptedPeer(instance(root).control_socket)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def run(root: Path, *argv: str) -> int:
    """``ikosctl --root ROOT ARGV...``."""
    return main(["--root", str(root), *argv])


def one_error_line(err: str) -> str:
    """The single ``ikosctl: ...`` line of stderr, checked as such."""
    assert err.startswith("ikosctl: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err[len("ikosctl: ") : -1]


# --- options and placement -------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--root", "{root}", "--json", "status", "echo"],
        ["status", "echo", "--root", "{root}", "--json"],
        ["--json", "status", "--root", "{root}", "echo"],
        ["--root", "{root}", "status", "--json", "echo"],
    ],
)
def test_root_and_json_are_accepted_before_and_after_the_verb(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    peer.scripts["status"] = ok([status_of("echo")])
    assert main([a.replace("{root}", str(root)) for a in argv]) == 0
    assert json.loads(capsys.readouterr().out) == [status_of("echo")]
    assert peer.sent() == [("status", {"names": ["echo"]})]


def test_the_root_comes_from_ikos_root_without_the_option(
    peer: ScriptedPeer,
    root: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IKOS_ROOT", str(root))
    peer.scripts["list"] = ok([])
    assert main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_root_option_wins_over_ikos_root(
    peer: ScriptedPeer,
    root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IKOS_ROOT", str(tmp_path_factory.mktemp("elsewhere")))
    peer.scripts["list"] = ok([])
    assert run(root, "list") == 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["status", "--bogus"],
        ["kill", "-s", "NOPE", "echo"],
        ["kill", "-s", "0", "echo"],
        ["call", "echo", "1", "--timeout", "-1"],
        ["start"],
        ["logs", "-n", "x", "echo"],
    ],
)
def test_usage_errors_are_one_line_and_exit_1(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert run(root, *argv) == 1
    captured = capsys.readouterr()
    assert "--help" in one_error_line(captured.err)
    assert captured.out == ""
    assert peer.requests == []


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "status" in capsys.readouterr().out


# --- status, list, tree, is-active ----------------------------------------------------


def test_status_exits_0_when_every_daemon_runs(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["status"] = ok([status_of("echo", description="answers pings")])
    assert run(root, "status", "echo") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "echo - answers pings"
    assert "State: running (pid 1234) since " in out
    assert "; 12s ago" in out
    assert "Supervisor: root" in out
    assert "\x1b[" not in out and "●" not in out


def test_status_exits_3_when_one_daemon_does_not_run(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["status"] = ok([status_of("echo"), status_of("w1", "stopped")])
    assert run(root, "status", "echo", "w1") == 3
    assert peer.sent() == [("status", {"names": ["echo", "w1"]})]


def test_status_without_names_asks_for_all(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["status"] = ok([ROOT_STATUS, status_of("echo")])
    assert run(root, "status") == 0
    assert peer.sent() == [("status", {"names": []})]


def test_status_json_is_an_array_even_for_one_name(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["status"] = ok([status_of("echo", "failed")])
    assert run(root, "status", "echo", "--json") == 3
    assert json.loads(capsys.readouterr().out) == [status_of("echo", "failed")]


def test_status_of_an_unknown_name_exits_4(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["status"] = fail("no_such_daemon", "no daemon named 'ech'")
    assert run(root, "status", "ech") == 4
    captured = capsys.readouterr()
    assert one_error_line(captured.err) == "no daemon named 'ech'"
    assert captured.out == ""


def test_list_off_a_terminal_prints_tab_separated_rows_or_a_json_array(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statuses = [ROOT_STATUS, status_of("echo"), status_of("w1", "stopped")]
    peer.scripts["list"] = ok(statuses)
    assert run(root, "list") == 0
    assert capsys.readouterr().out == (
        "root\tsupervisor\trunning\t-\t2\t12\t-\n"
        "echo\tactor\trunning\t1234\t2\t12\troot\n"
        "w1\tactor\tstopped\t-\t2\t-\troot\n"
    )
    assert run(root, "--json", "list") == 0
    assert json.loads(capsys.readouterr().out) == statuses


def test_list_on_a_terminal_is_a_table_with_a_header() -> None:
    statuses = [ROOT_STATUS, status_of("echo"), status_of("w1", "stopped")]
    lines = render_list(statuses, Style(table=True), NOW).splitlines()
    assert lines[0].split() == list(LIST_COLUMNS)
    assert lines[2].split() == ["echo", "actor", "running", "1234", "2", "12s", "root"]
    assert lines[3].split() == ["w1", "actor", "stopped", "-", "2", "-", "root"]


def test_a_tab_in_a_name_cannot_shift_a_column() -> None:
    out = render_list([status_of("a\tb")], Style(table=False), NOW)
    assert out.split("\t")[0] == "a?b"


def test_tree_prints_box_drawing_or_the_root_node(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["tree"] = ok(TREE)
    assert run(root, "tree") == 0
    assert capsys.readouterr().out == (
        "root [supervisor one_for_one] running\n"
        "├─ echo [actor] running 1234\n"
        "└─ workers [supervisor rest_for_one] running\n"
        "   └─ w1 [exec] backoff\n"
    )
    assert run(root, "tree", "--json") == 0
    assert json.loads(capsys.readouterr().out) == TREE


def test_is_active_prints_each_state_and_exits_3_when_one_is_not_running(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    states = {"echo": "running", "w1": "backoff"}
    peer.scripts["status"] = lambda request: ok(
        [status_of(n, states[n]) for n in request["args"]["names"]]
    )(request)
    assert run(root, "is-active", "echo", "w1") == 3
    assert capsys.readouterr().out == "running\nbackoff\n"
    assert peer.sent() == [("status", {"names": ["echo"]}), ("status", {"names": ["w1"]})]
    assert run(root, "is-active", "echo") == 0
    assert capsys.readouterr().out == "running\n"


def test_is_active_json_is_an_array_of_name_state_active(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["status"] = lambda request: ok(
        [status_of(n, "running" if n == "echo" else "stopped") for n in request["args"]["names"]]
    )(request)
    assert run(root, "is-active", "--json", "echo", "w1") == 3
    assert json.loads(capsys.readouterr().out) == [
        {"name": "echo", "state": "running", "active": True},
        {"name": "w1", "state": "stopped", "active": False},
    ]


def test_is_active_of_an_unknown_name_exits_4_and_still_shows_the_others(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def script(request: dict[str, Any]) -> Sequence[Any]:
        name = request["args"]["names"][0]
        if name == "ech":
            return fail("no_such_daemon", "no daemon named 'ech'")(request)
        return ok([status_of(name)])(request)

    peer.scripts["status"] = script
    assert run(root, "is-active", "ech", "echo") == 4
    captured = capsys.readouterr()
    assert captured.out == "unknown\nrunning\n"
    assert one_error_line(captured.err) == "no daemon named 'ech'"


# --- control verbs ---------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["start", "stop", "restart", "reload"])
def test_lifecycle_verbs_send_one_request_per_name(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    peer.scripts[verb] = lambda request: ok(status_of(request["args"]["name"]))(request)
    assert run(root, verb, "echo", "w1") == 0
    assert capsys.readouterr().out == ""
    assert peer.sent() == [(verb, {"name": "echo"}), (verb, {"name": "w1"})]
    assert run(root, verb, "echo", "--json") == 0
    assert json.loads(capsys.readouterr().out) == [status_of("echo")]


def test_start_of_an_unknown_name_exits_4(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["start"] = fail("no_such_daemon", "no daemon named 'ech'")
    assert run(root, "start", "ech") == 4
    assert one_error_line(capsys.readouterr().err) == "no daemon named 'ech'"


def test_permission_denied_exits_1(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["stop"] = fail("permission_denied", "uid 1001 may only read")
    assert run(root, "stop", "echo") == 1
    assert one_error_line(capsys.readouterr().err) == "uid 1001 may only read"


@pytest.mark.parametrize(
    ("argv", "signal"),
    [
        ([], "SIGTERM"),
        (["-s", "9"], 9),
        (["-s", "KILL"], "SIGKILL"),
        (["-s", "SIGKILL"], "SIGKILL"),
        (["--signal", "usr1"], "SIGUSR1"),
    ],
)
def test_kill_sends_the_signal_number_or_canonical_name(
    peer: ScriptedPeer,
    root: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    signal: int | str,
) -> None:
    peer.scripts["kill"] = ok({"name": "echo", "pid": 1234, "signal": 9})
    assert run(root, "kill", *argv, "echo") == 0
    assert peer.sent() == [("kill", {"name": "echo", "signal": signal})]


def test_parse_signal() -> None:
    assert parse_signal("15") == 15
    assert parse_signal(" hup ") == "SIGHUP"
    for bad in ("", "SIG", "NOPE", "0", "100000"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_signal(bad)


@pytest.mark.parametrize(
    ("data", "sent"),
    [
        ('{"op": "ping", "n": [1, 2]}', {"op": "ping", "n": [1, 2]}),
        ("42", 42),
        ('"quoted"', "quoted"),
        ("null", None),
        ("hello world", "hello world"),
        ("NaN", "NaN"),
        ("{broken", "{broken"),
        ("", ""),
    ],
)
def test_call_and_tell_read_data_as_json_or_as_a_string(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str], data: str, sent: Any
) -> None:
    peer.scripts["call"] = ok({"reply": "pong"})
    peer.scripts["tell"] = ok({})
    assert run(root, "call", "echo", data) == 0
    assert run(root, "tell", "echo", data) == 0
    assert peer.sent() == [
        ("call", {"name": "echo", "data": sent, "timeout": 10.0}),
        ("tell", {"name": "echo", "data": sent}),
    ]
    assert parse_data(data) == sent


@pytest.mark.parametrize(
    ("result", "plain", "as_json"),
    [
        ({"reply": "pong"}, "pong\n", "pong"),
        ({"reply": {"n": 1}}, '{"n": 1}\n', {"n": 1}),
        ({"reply": None}, "null\n", None),
        ({"reply_repr": "<Thing 1>"}, "<Thing 1>\n", "<Thing 1>"),
    ],
)
def test_call_prints_the_reply(
    peer: ScriptedPeer,
    root: Path,
    capsys: pytest.CaptureFixture[str],
    result: dict[str, Any],
    plain: str,
    as_json: Any,
) -> None:
    peer.scripts["call"] = ok(result)
    assert run(root, "call", "echo", "ping", "--timeout", "2.5") == 0
    assert capsys.readouterr().out == plain
    assert run(root, "call", "--json", "echo", "ping") == 0
    assert json.loads(capsys.readouterr().out) == as_json
    assert peer.sent()[0] == ("call", {"name": "echo", "data": "ping", "timeout": 2.5})


def test_call_of_an_unknown_actor_exits_4(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["call"] = fail("no_such_daemon", "no actor named 'ech'")
    assert run(root, "call", "ech", "1") == 4
    assert one_error_line(capsys.readouterr().err) == "no actor named 'ech'"


def test_reload_config_and_shutdown(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["reload_config"] = ok({"added": ["new"], "removed": [], "changed": ["echo"]})
    peer.scripts["shutdown"] = ok({})
    assert run(root, "reload-config") == 0
    assert capsys.readouterr().out == "added: new\nchanged: echo\n"
    assert run(root, "shutdown") == 0
    assert run(root, "shutdown", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {}
    assert peer.sent() == [("reload_config", {}), ("shutdown", {}), ("shutdown", {})]


# --- verbs the server serves, and those it does not ------------------------------------


#: The verbs of ikosctl in ../shared/CONTRACT.md ("ikosctl, the command line").
CONTRACT_VERBS = [
    *("start", "stop", "restart", "reload", "status", "list", "tree", "is-active", "logs"),
    *("kill", "top", "services", "discover", "publish", "subscribe", "call", "queue"),
    *("upgrade", "alerts", "events", "reload-config", "shutdown"),
]


def test_every_verb_of_the_contract_is_served() -> None:
    # `upgrade` was the last one answering "not available in this version"
    assert not UNAVAILABLE_VERBS
    assert [v for v in CONTRACT_VERBS if v not in PROTOCOL_VERBS] == []


def test_help_offers_exactly_the_verbs_with_protocol_requests(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in PROTOCOL_VERBS:
        assert f"    {verb} " in out or f"    {verb}\n" in out, verb
    for verb in UNAVAILABLE_VERBS:
        assert f" {verb} " not in out, verb
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(PROTOCOL_VERBS)


@pytest.mark.parametrize(
    ("argv", "verb", "result", "plain"),
    [
        (["logs", "echo"], "logs", {"lines": ["one", "two"]}, "one\ntwo\n"),
        (
            ["services"],
            "services",
            [{"name": "db", "version": "1.0", "pid": 7, "active": True}],
            "db\t-\t1.0\t-\t-\t7\t-\tyes\t-\n",
        ),
        (["discover", "db"], "discover", {"name": "db", "pid": 7}, "name: db\npid:  7\n"),
        (
            ["upgrade", "counter"],
            "upgrade",
            {"name": "counter", "upgraded": True, "old_pid": 7, "pid": 9, "state": "fresh"},
            "counter: upgraded, pid 7 -> 9, fresh state\n",
        ),
        # Nothing to show, off a terminal: nothing printed, not even a blank line.
        (["services"], "services", [], ""),
        (["logs", "echo"], "logs", {"name": "echo", "lines": []}, ""),
    ],
)
def test_reading_verbs_print_text_or_one_json_document(
    peer: ScriptedPeer,
    root: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    verb: str,
    result: Any,
    plain: str,
) -> None:
    peer.scripts[verb] = ok(result)
    assert run(root, *argv) == 0
    assert capsys.readouterr() == (plain, "")
    assert run(root, *argv, "--json") == 0
    assert json.loads(capsys.readouterr().out) == result


def test_services_table_on_a_terminal_shows_only_the_columns_in_use() -> None:
    services = [{"name": "db", "version": "1.0", "pid": 7, "active": True}]
    assert render_services(services, Style(table=True)) == (
        "NAME  VERSION  PID  ACTIVE\ndb    1.0      7    yes\n"
    )
    assert render_services([], Style(table=True)) == ""


def test_reload_config_prints_the_servers_warnings_on_stderr(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = {"added": [], "removed": [], "changed": [], "warnings": ["unknown key 'x'", "b\nc"]}
    peer.scripts["reload_config"] = ok(result)
    assert run(root, "reload-config") == 0
    captured = capsys.readouterr()
    assert captured.out == "no changes\n"
    assert captured.err == "ikosctl: warning: unknown key 'x'\nikosctl: warning: b c\n"
    assert run(root, "reload-config", "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    assert captured.err.count("ikosctl: warning:") == 2


def test_logs_follow_prints_events_as_they_come(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["logs"] = events(["one", {"line": "two"}])
    assert run(root, "logs", "-f", "echo") == 0
    assert capsys.readouterr().out == "one\ntwo\n"
    assert run(root, "logs", "-f", "echo", "--json") == 0
    out = capsys.readouterr().out
    assert [json.loads(line) for line in out.splitlines()] == ["one", {"line": "two"}]
    assert peer.sent() == [
        ("logs", {"name": "echo", "follow": True}),
        ("logs", {"name": "echo", "follow": True}),
    ]


def test_a_streaming_verb_the_server_lacks_exits_1(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(root, "logs", "-f", "echo") == 1
    assert one_error_line(capsys.readouterr().err) == "unknown verb 'logs'"


# --- transport failures -----------------------------------------------------------------


def test_a_missing_socket_exits_1_naming_the_path(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(root, "status") == 1
    message = one_error_line(capsys.readouterr().err)
    assert str(InstancePaths.for_root(root).control_socket) in message


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (raw(b"garbage\n"), "malformed answer"),
        (raw(b'{"id": 1, "ok": true, "res', CLOSE), "closed the connection"),
        (raw(CLOSE), "closed the connection"),
        (ok({"not": "a list"}), "something other than an array"),
    ],
)
def test_a_broken_server_exits_1_with_one_clear_line(
    peer: ScriptedPeer,
    root: Path,
    capsys: pytest.CaptureFixture[str],
    answer: Any,
    words: str,
) -> None:
    peer.scripts["list"] = answer
    assert run(root, "list") == 1
    captured = capsys.readouterr()
    assert words in one_error_line(captured.err)
    assert captured.out == ""


def test_a_call_without_answer_times_out(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.scripts["call"] = raw(HANG)
    assert run(root, "call", "echo", "1", "--timeout", "0.05") == 1
    message = one_error_line(capsys.readouterr().err)
    assert "did not answer 'call' within 1.05s" in message


def test_a_long_socket_path_still_connects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IKOS_ROOT", raising=False)
    root = deep_root(tmp_path)
    server = ScriptedPeer(instance(root).control_socket)
    try:
        server.start()
        server.scripts["echo"] = echo_args
        server.scripts["list"] = ok([status_of("echo")])
        assert run(root, "list", "--json") == 0
        assert json.loads(capsys.readouterr().out) == [status_of("echo")]
    finally:
        server.stop()


# --- rendering --------------------------------------------------------------------------


def test_humanize_duration() -> None:
    cases = {0: "0s", 3: "3s", 59.9: "59s", 125: "2m 5s", 3720: "1h 2m", 273600: "3d 4h"}
    assert {s: humanize_duration(s) for s in cases} == cases
    assert humanize_duration(-5) == "0s"
    assert humanize_duration(float("nan")) == "0s"


def test_status_block_fields() -> None:
    last_exit = {"reason": "killed by SIGKILL", "code": None, "signal": 9, "at": NOW - 60}
    text = render_status(
        [status_of("echo", description="answers pings", last_exit=last_exit), ROOT_STATUS],
        Style(),
        NOW,
    )
    blocks = text.split("\n\n")
    assert len(blocks) == 2
    echo = blocks[0].splitlines()
    assert echo[0] == "echo - answers pings"
    labels = [line.split(":")[0].strip() for line in echo[1:]]
    assert labels == ["Kind", "State", "Restart", "Restarts", "Supervisor", "Last exit"]
    assert len({line.index(":") for line in echo[1:]}) == 1  # aligned
    assert "Kind: actor (examples.demo:Echo)" in blocks[0]
    assert "Restarts: 2" in blocks[0]
    assert "Last exit: killed by SIGKILL at " in blocks[0]
    assert "Kind: supervisor (one_for_one, at most 3 restarts in 5s)" in blocks[1]
    assert "Supervisor: none (root of the tree)" in blocks[1]
    assert "Children: echo, workers" in blocks[1]
    assert "State: running since" in blocks[1]


def test_colours_and_bullet_only_with_a_colour_style() -> None:
    statuses = [status_of("echo"), status_of("w1", "failed"), status_of("w2", "stopped")]
    plain = render_status(statuses, Style(color=False), NOW) + render_list(
        statuses, Style(color=False), NOW
    )
    assert "\x1b[" not in plain and "●" not in plain
    coloured = render_status(statuses, Style(color=True), NOW)
    assert "\x1b[32m●\x1b[0m" in coloured  # green bullet of a running daemon
    assert "\x1b[32mrunning\x1b[0m" in coloured
    assert "\x1b[31mfailed\x1b[0m" in coloured
    assert "\x1b[90mstopped\x1b[0m" in coloured
    table = render_list(statuses, Style(color=True), NOW).splitlines()
    # Colour codes do not shift the columns.
    strip = [line.replace("\x1b[32m", "").replace("\x1b[31m", "") for line in table]
    strip = [line.replace("\x1b[90m", "").replace("\x1b[0m", "") for line in strip]
    assert strip == render_list(statuses, Style(color=False), NOW).splitlines()


def test_style_follows_the_terminal_and_no_color(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)

    class Terminal:
        encoding = "utf-8"

        def isatty(self) -> bool:
            return True

    assert Style.for_stream(Terminal()) == Style(color=True, unicode=True)  # type: ignore[arg-type]
    monkeypatch.setenv("NO_COLOR", "1")
    # NO_COLOR takes the colours away, not the table.
    assert Style.for_stream(Terminal()) == Style(color=False, unicode=True, table=True)  # type: ignore[arg-type]
    with open(tmp_path / "out", "w", encoding="ascii") as not_a_terminal:
        assert Style.for_stream(not_a_terminal) == Style(color=False, unicode=False, table=False)


def test_tree_falls_back_to_ascii() -> None:
    assert render_tree(TREE, Style(unicode=False)) == (
        "root [supervisor one_for_one] running\n"
        "|- echo [actor] running 1234\n"
        "`- workers [supervisor rest_for_one] running\n"
        "   `- w1 [exec] backoff\n"
    )


def test_text_from_the_server_cannot_drive_the_terminal() -> None:
    text = render_status([status_of("echo", description="evil\x1b[2J\nline")], Style(), NOW)
    assert "\x1b" not in text
    assert text.splitlines()[0] == "echo - evil?[2J?line"


def test_ikosctl_runs_as_a_program(peer: ScriptedPeer, root: Path) -> None:
    peer.scripts["list"] = ok([status_of("echo")])
    peer.scripts["status"] = fail("no_such_daemon", "no daemon named 'ech'")
    command = [sys.executable, "-W", "error", "-m", "ikos.cli._ikosctl", "--root", str(root)]
    listed = subprocess.run([*command, "list", "--json"], capture_output=True, timeout=60)
    assert (listed.returncode, listed.stderr) == (0, b"")
    assert json.loads(listed.stdout) == [status_of("echo")]
    unknown = subprocess.run([*command, "status", "ech"], capture_output=True, timeout=60)
    assert (unknown.returncode, unknown.stdout) == (4, b"")
    assert unknown.stderr == b"ikosctl: no daemon named 'ech'\n"


def follow_in_a_process(root: Path) -> subprocess.Popen[bytes]:
    """``ikosctl logs -f echo`` as a program, once it printed its first line."""
    command = [sys.executable, "-m", "ikos.cli._ikosctl", "--root", str(root), "logs", "-f", "echo"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "ikosctl printed no line"
    assert proc.stdout.readline() == b"first\n"
    return proc


def test_ctrl_c_ends_logs_follow_quietly_with_status_0(peer: ScriptedPeer, root: Path) -> None:
    peer.scripts["logs"] = lambda request: [{"id": request["id"], "event": "first"}, HANG]
    proc = follow_in_a_process(root)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (0, b"")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def test_logs_follow_into_a_closed_pipe_ends_quietly_with_status_0(
    peer: ScriptedPeer, root: Path
) -> None:
    peer.scripts["logs"] = lambda request: [
        {"id": request["id"], "event": "first"},
        *({"id": request["id"], "event": f"line {n}"} for n in range(1000)),
        HANG,
    ]
    proc = follow_in_a_process(root)
    try:
        assert proc.stdout is not None
        proc.stdout.close()  # ``| head -1`` has read its line and left
        assert proc.wait(timeout=60) == 0
        assert proc.stderr is not None
        with proc.stderr:
            assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def test_a_failed_upgrade_prints_its_first_line_and_exits_1(
    peer: ScriptedPeer, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = "actor 'counter' was not upgraded: set_state raised KeyError: 'n' (pid 7 serves on)"
    peer.scripts["upgrade"] = fail("upgrade_failed", f"{line}\nTraceback (most recent...)\n...")
    for argv in (["upgrade", "counter"], ["upgrade", "counter", "--json"]):
        assert run(root, *argv) == 1
        captured = capsys.readouterr()
        assert one_error_line(captured.err) == line
        assert captured.out == ""
